r"""How prefix keys/values reach attention: a wrapper around transformers' attention interface.

transformers 5.x attention modules call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with the projected (and, for Llama, rotated) keys and values. We register two implementations,
``peftlab_prefix_sdpa`` and ``peftlab_prefix_eager``, that prepend the layer's prefix before calling
the original one::

    K' = [P_K ; K],  V' = [P_V ; V]        P_K, P_V: (batch, kv_heads, n_prefix, head_dim)
    mask' = [attend-all (n_prefix columns) | mask]

A layer narrower than the table (Gemma-4's sliding layers: a smaller head dim than its full-attention
layers) takes its first key/value heads and head-dim columns, as HF PEFT slices its one-width table.

On a sliding-window layer (Gemma-2/3, Mistral, Qwen2, GPT-OSS) a prefix column j leaves the window of the
token at position p once (n_prefix + p) − j ≥ window, exactly as HF PEFT's prefix (a KV cache at positions
0..n−1) does.

Keys and values are prepended at the key/value-head level (before grouped-query repetition),
so GQA models take a prefix of ``num_key_value_heads`` heads. Models with a fused query-key-value
projection (GPT-2 ``c_attn``, GPT-NeoX ``query_key_value``, Phi-3 ``qkv_proj``) split it before this
interface, so they need nothing special. The KV cache of ``generate`` holds only real tokens; the
prefix is prepended at every call, so cached and uncached decoding agree.

Each layer's prefix is computed inside its own attention call (``holder.layer_kv(i)``, for a
reparameterised prefix the MLP restricted to that layer's output rows), so every layer's graph
is independent: activation checkpointing (re-entrant or not) recomputes a layer without walking
through another layer's graph.
"""

from __future__ import annotations

import torch
from torch import nn

#: where a prefixed model keeps its :class:`PrefixHolder` and its ``nn.ModuleDict`` of prefix tables
PREFIX_HOLDER_ATTR = "_peftlab_prefix_holder"
PREFIX_TABLES_ATTR = "peftlab_prefix"

ORIGINAL = {"peftlab_prefix_sdpa": "sdpa", "peftlab_prefix_eager": "eager"}
_REGISTERED = False


class PrefixHolder:
    """Plain object (not a Module) shared by the attention modules of one model.

    ``layer_kv``: ``i -> (K, V)``, each (kv_heads, n_prefix, head_dim), for the current forward, or
    None; set by the forward pre-hook of the running prefix adapter. ``active``: the names of the active
    prefix adapters (at most one may run); ``disabled``: names switched off; ``folded``:
    ``{name: merged (MLP-free) table}``.
    """

    def __init__(self, n_prefix: int) -> None:
        self.n_prefix = n_prefix
        self.layer_kv = None
        self.folded: dict[str, torch.Tensor] = {}
        self.active: list[str] = []
        self.disabled: set[str] = set()
        #: the module whose ``position_ids`` move past the prefix: "" (the model) or a VLM's language model
        self.positions_at = ""
        #: during a mixed batch on a VLM: the hook that shifts the language model's positions per row
        self.rows_hook = None

    def drop_rows_hook(self) -> None:
        """Remove the per-row position hook of a mixed batch, if any."""
        if self.rows_hook is not None:
            self.rows_hook.remove()
            self.rows_hook = None

    def running(self) -> str | None:
        """The prefix adapter that runs now (None: none); two active at once is an error."""
        names = [n for n in self.active if n not in self.disabled]
        if len(names) > 1:
            raise RuntimeError(
                f"prefix adapters {names} are active together; only one prefix can run at a time "
                f"(set_active_adapters with one prefix adapter)"
            )
        return names[0] if names else None

    @property
    def enabled(self) -> bool:
        return self.running() is not None


def _prefix_mask(attention_mask, module, q_len: int, k_len: int, n_prefix: int, query: torch.Tensor):
    """The attention mask with ``n_prefix`` always-attended columns in front."""
    if attention_mask is None:
        if not getattr(module, "is_causal", False) or q_len == 1:
            return None
        # causal over the real keys (queries are the last q_len of the k_len keys), prefix always visible
        i = torch.arange(q_len, device=query.device).view(-1, 1) + (k_len - q_len)
        j = torch.arange(k_len, device=query.device).view(1, -1)
        attention_mask = (j <= i).view(1, 1, q_len, k_len)
    lead = attention_mask.shape[:-1]
    if attention_mask.dtype == torch.bool:
        ones = torch.ones(*lead, n_prefix, dtype=torch.bool, device=attention_mask.device)
    else:
        ones = torch.zeros(*lead, n_prefix, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([ones, attention_mask], dim=-1)


def _slide_prefix_out(mask: torch.Tensor, n_prefix: int, k_len: int, window: int) -> torch.Tensor:
    """Hide prefix column j from the query at real position p once it is out of a sliding window, as HF PEFT's
    prefix (a KV cache at positions 0..n-1, the tokens at n..) is: visible iff (n + p) − j < window, the rule of
    transformers' sliding masks. mask: (..., q_len, n_prefix + k_len), the prefix columns first (a new tensor)."""
    q_len = mask.shape[-2]
    p = torch.arange(q_len, device=mask.device).view(-1, 1) + (k_len - q_len)  # real positions of the queries
    j = torch.arange(n_prefix, device=mask.device).view(1, -1)
    hide = (n_prefix + p - j) >= window  # (q_len, n_prefix)
    if not hide.any():
        return mask
    front = mask[..., :n_prefix]
    if mask.dtype == torch.bool:
        front = front & ~hide
    else:
        front = front.masked_fill(hide, torch.finfo(mask.dtype).min)
    return torch.cat([front, mask[..., n_prefix:]], dim=-1)


def fit(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """A layer's prefix keys or values, (batch, kv_heads, n, head_dim), cut to the layer's own key/value heads and
    head dim where it is narrower than the table (Gemma-4's sliding layers: the first heads and the first columns,
    as HF PEFT slices its one-width table)."""
    heads, dim = states.shape[1], states.shape[-1]
    if prefix.shape[1] == heads and prefix.shape[-1] == dim:
        return prefix
    return prefix[:, :heads, :, :dim]


def _eager_for(module: nn.Module):
    """The eager attention function of the module's own modeling file (softcapping, scaling...), else Llama's."""
    import sys

    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    return fn


def _make_attention(impl_name: str):
    def attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        original = ORIGINAL[impl_name]
        fn = _eager_for(module) if original == "eager" else ALL_ATTENTION_FUNCTIONS[original]
        holder: PrefixHolder | None = getattr(module, "_peftlab_prefix", None)
        rows = getattr(holder, "rows", None)  # a mixed batch: one prefix (or none) per row, see peftlab.serving
        if rows is not None:
            key, value, attention_mask = rows.extend(module, query, key, value, attention_mask)
            if rows.kv is not None:
                kwargs.pop("is_causal", None)
        elif holder is not None and holder.enabled and holder.layer_kv is not None:
            batch = query.shape[0]
            pk, pv = holder.layer_kv(module._peftlab_prefix_layer)
            pk = fit(pk.unsqueeze(0).expand(batch, -1, -1, -1).to(key.dtype), key)
            pv = fit(pv.unsqueeze(0).expand(batch, -1, -1, -1).to(value.dtype), value)
            attention_mask = _prefix_mask(
                attention_mask, module, query.shape[2], key.shape[2], holder.n_prefix, query
            )
            if attention_mask is not None and attention_mask.shape[-1] != key.shape[2] + holder.n_prefix:
                attention_mask = attention_mask[..., : key.shape[2] + holder.n_prefix]
            window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
            if attention_mask is not None and isinstance(window, int) and window > 0:
                attention_mask = _slide_prefix_out(attention_mask, holder.n_prefix, key.shape[2], window)
            key = torch.cat([pk, key], dim=2)
            value = torch.cat([pv, value], dim=2)
            kwargs.pop("is_causal", None)  # the explicit mask (or none, for encoders) decides
        return fn(module, query, key, value, attention_mask, **kwargs)

    return attention


def register() -> None:
    """Register the two wrapper implementations (and their mask functions) once."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for name, original in ORIGINAL.items():
        AttentionInterface.register(name, _make_attention(name))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    _REGISTERED = True
