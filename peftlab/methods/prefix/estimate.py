"""How the memory estimator counts prefix tuning: the prefix table E (n × L·2·d_kv), or E' (n × d_kv) and the
reparameterisation MLP d_kv → p → L·2·d_kv; k and v of every layer get n more positions."""

from __future__ import annotations

from ...core.registry import EstimateRules


def extra_params(model, cfg, out) -> list[int]:
    """Prefix encoder: E (n × L·2·d_kv), or E' (n × d_kv) and the MLP d_kv → p → L·2·d_kv."""
    config = out.config
    heads = config.num_attention_heads
    d_kv = (getattr(config, "num_key_value_heads", None) or heads) * (
        getattr(config, "head_dim", None) or config.hidden_size // heads
    )
    n, L, p = cfg.num_virtual_tokens, out.n_layers, cfg.projection_dim
    out.prefix_tokens = n
    if not p:
        return [n * L * 2 * d_kv]
    return [n * d_kv, p * d_kv, p, L * 2 * d_kv * p, L * 2 * d_kv]


RULES = EstimateRules(extra_params=extra_params)
