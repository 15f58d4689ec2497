r"""Prefix tuning (Li & Liang, 2021, arXiv:2101.00190) for decoder and encoder models.

Every attention layer l gets n learned key and value vectors prepended::

    head_i = Attention(x W_q, [P_K^l ; x W_k], [P_V^l ; x W_v])

    P = E                                   (flat: E is n × (L·2·d_kv))
    P = W_2 tanh(W_1 E' + b_1) + b_2        (reparameterised, projection_dim set: E' is n × d_kv)

with d_kv = num_key_value_heads · head_dim (so grouped-query models get KV-head prefixes) and
L the number of layers. Only E (and the MLP) train. ``merge`` folds the MLP into a flat table, so
inference needs no MLP; ``unmerge`` brings the MLP back. The real tokens' positions start at n
(the prefix occupies positions 0..n-1), as in Hugging Face PEFT, whose layout this matches for
export/import. How the prefix reaches attention: :mod:`peftlab.methods.prefix_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig, register_config
from ..errors import ConfigError, MergeError, TargetError
from ..layers import SLOT_ROLES
from ..registry import Method, register_method
from . import prefix_attention

SUPPORTED_ATTENTION = ("sdpa", "eager")


@register_config
@dataclass
class PrefixConfig(PeftConfig):
    """Args:
    num_virtual_tokens: n, the prefix length per layer.
    projection_dim: hidden size of the reparameterisation MLP; None trains the flat table directly.
    """

    method = "prefix"

    num_virtual_tokens: int = 20
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_modules is not None:
            raise ConfigError("prefix tuning adapts every attention layer; it takes no target_modules")
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ConfigError(
                f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}"
            )
        if self.projection_dim is not None and (
            isinstance(self.projection_dim, bool) or not isinstance(self.projection_dim, int) or self.projection_dim <= 0
        ):
            raise ConfigError(
                f"projection_dim must be a positive integer or None, got {self.projection_dim!r}"
            )


class PrefixEncoder(nn.Module):
    """Produces the prefix table P: (n, L·2·d_kv). Parameter names follow HF PEFT's PrefixEncoder."""

    def __init__(
        self, n: int, n_layers: int, d_kv: int, projection_dim: int | None, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.n, self.n_layers, self.d_kv = n, n_layers, d_kv
        kw = {"device": device, "dtype": dtype}
        if projection_dim:
            self.embedding = nn.Embedding(n, d_kv, **kw)
            self.transform = nn.Sequential(
                nn.Linear(d_kv, projection_dim, **kw),
                nn.Tanh(),
                nn.Linear(projection_dim, n_layers * 2 * d_kv, **kw),
            )
        else:
            self.embedding = nn.Embedding(n, n_layers * 2 * d_kv, **kw)
            self.transform = None

    def forward(self) -> torch.Tensor:
        table = self.embedding.weight
        return self.transform(table) if self.transform is not None else table


def _geometry(model: nn.Module) -> tuple[int, int, int, list[nn.Module]]:
    """(n_layers, kv_heads, head_dim, attention modules) of a transformers model."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    if heads is None or hidden is None:
        raise TargetError(
            f"prefix tuning needs num_attention_heads and hidden_size in the config of {type(model).__name__}"
        )
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    attn = [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx")
        and type(m).__name__.endswith("Attention")
        and any(hasattr(m, name) for name in ("k_proj", "key"))
    ]
    if not attn:
        raise TargetError(
            f"prefix tuning can't find attention layers in {type(model).__name__}: it supports transformers models "
            f"whose attention modules (with layer_idx and k_proj/key projections) use the attention interface"
        )
    return len(attn), kv_heads, head_dim, attn


HOLDER_ATTR = "_peftlab_prefix_holder"
TABLES_ATTR = "peftlab_prefix"
SLOT_ROLES.add(TABLES_ATTR)


def inject_prefix(model: nn.Module, config: PrefixConfig, txn) -> dict[str, Any]:
    """Add a prefix table ``peftlab_prefix.<name>`` and a pre-hook that feeds it to attention when it runs."""
    if getattr(model, "config", None) is None:
        raise TargetError(
            f"prefix tuning needs a transformers model with a .config (attention geometry, attn_implementation); "
            f"{type(model).__name__} has none"
        )
    holder = getattr(model, HOLDER_ATTR, None)
    n_layers, kv_heads, head_dim, attn = _geometry(model)
    if holder is None:
        impl = model.config._attn_implementation or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise ConfigError(
                f"prefix tuning supports attn_implementation {SUPPORTED_ATTENTION}, the model uses {impl!r}; "
                f"load it with attn_implementation='sdpa'"
            )
        prefix_attention.register()
        holder = prefix_attention.PrefixHolder(config.num_virtual_tokens)
        for module in attn:
            module._peftlab_prefix = holder
        setattr(model, HOLDER_ATTR, holder)
        model.config._attn_implementation = f"peftlab_prefix_{impl}"
        txn.undo.append(lambda: _detach_holder(model, impl))
    else:
        impl = prefix_attention.ORIGINAL[model.config._attn_implementation]
    weight = next(model.parameters())
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    encoder = PrefixEncoder(
        config.num_virtual_tokens,
        n_layers,
        kv_heads * head_dim,
        config.projection_dim,
        device=weight.device,
        dtype=dtype,
    )
    for p in encoder.parameters():
        p.requires_grad_(True)
    tables = getattr(model, TABLES_ATTR, None)
    if tables is None:
        tables = nn.ModuleDict()
        model.add_module(TABLES_ATTR, tables)
    tables[config.adapter_name] = encoder
    txn.undo.append(lambda: _drop_table(model, config.adapter_name))
    name = config.adapter_name

    def pre_hook(mod, args, kwargs):
        if getattr(holder, "rows", None) is not None or holder.running() != name:  # rows: a mixed batch routes
            return args, kwargs
        enc = getattr(mod, TABLES_ATTR)[name]
        table = holder.folded[name] if name in holder.folded else enc()
        holder.kv = table.view(enc.n, n_layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)
        holder.n_prefix = enc.n
        return args, _shift_positions(args, kwargs, enc.n)

    txn.hook(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
    return {
        "targets": [],
        "shapes": {},
        "owned_modules": [f"{TABLES_ATTR}.{name}"],
        "live": {"holder": holder},
        "info": {"attn_impl": impl, "geometry": [n_layers, kv_heads, head_dim]},
    }


def _drop_table(model: nn.Module, name: str) -> None:
    tables = getattr(model, TABLES_ATTR, None)
    if tables is not None and name in tables:
        del tables[name]
        if len(tables) == 0:
            delattr(model, TABLES_ATTR)


def _detach_holder(model: nn.Module, impl: str) -> None:
    holder = getattr(model, HOLDER_ATTR, None)
    for module in model.modules():
        if getattr(module, "_peftlab_prefix", None) is holder:
            del module._peftlab_prefix
    if hasattr(model, HOLDER_ATTR):
        delattr(model, HOLDER_ATTR)
    model.config._attn_implementation = impl


def _shift_positions(args, kwargs, n_prefix: int) -> dict:
    """Real tokens take positions n_prefix, n_prefix+1, ... (the prefix occupies 0..n_prefix-1)."""
    if kwargs.get("position_ids") is not None:
        return {**kwargs, "position_ids": kwargs["position_ids"] + n_prefix}
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    if ref is None:
        return kwargs
    batch, length = ref.shape[0], ref.shape[1]
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    positions = (
        torch.arange(past + n_prefix, past + n_prefix + length, device=ref.device)
        .unsqueeze(0)
        .expand(batch, -1)
    )
    return {**kwargs, "position_ids": positions}


def _holder(model: nn.Module) -> prefix_attention.PrefixHolder:
    return getattr(model, HOLDER_ATTR)


def _remove(model: nn.Module, state) -> None:
    holder = _holder(model)
    holder.active = [n for n in holder.active if n != state.name]
    holder.disabled.discard(state.name)
    holder.folded.pop(state.name, None)
    _drop_table(model, state.name)
    if getattr(model, TABLES_ATTR, None) is None:
        _detach_holder(model, state.info["attn_impl"])


def _set_enabled(model: nn.Module, adapter_name: str, enabled: bool) -> None:
    holder = _holder(model)
    if enabled:
        holder.disabled.discard(adapter_name)
    else:
        holder.disabled.add(adapter_name)


def _set_active(model: nn.Module, state, active: bool, weight: float) -> None:
    holder = _holder(model)
    holder.active = [n for n in holder.active if n != state.name]
    if active:
        if weight != 1.0:
            raise ConfigError(
                f"prefix adapter {state.name!r} cannot be weighted (got weight {weight}): a prefix is not linear "
                f"in its table; activate it with weight 1"
            )
        others = [n for n in holder.active if n != state.name]
        if others:
            raise ConfigError(
                f"prefix adapters {others + [state.name]} cannot be active together; activate one prefix at a time"
            )
        holder.active.append(state.name)


@torch.no_grad()
def _merge(model: nn.Module, state) -> None:
    """Fold the reparameterisation MLP into a flat table used for inference (the MLP stays for unmerge)."""
    holder = _holder(model)
    if state.name in holder.folded:
        raise MergeError(f"prefix adapter {state.name!r} is already merged; call unmerge() first")
    holder.folded[state.name] = getattr(model, TABLES_ATTR)[state.name]().detach().clone()


def _unmerge(model: nn.Module, state) -> None:
    holder = _holder(model)
    if state.name not in holder.folded:
        raise MergeError(f"prefix adapter {state.name!r} is not merged; nothing to unmerge")
    del holder.folded[state.name]


def _is_merged(state) -> bool:
    return state.name in state.live.objects["holder"].folded


# ---- HF PEFT interop: one tensor, `prompt_embeddings` = the flat table (n, L·2·d_kv) -------------


def prepare_export(model, tensors: dict, state) -> dict:
    holder = _holder(model)
    with torch.no_grad():
        table = holder.folded.get(state.name)
        if table is None:
            table = getattr(model, TABLES_ATTR)[state.name]()
    return {"prompt_embeddings": table.detach()}


def prepare_import(model, tensors: dict, state) -> dict:
    return {f"{TABLES_ATTR}.embedding.weight": tensors["prompt_embeddings"]}


def to_peft_config(config: PrefixConfig, state) -> dict[str, Any]:
    n_layers, kv_heads, head_dim = state.info["geometry"]
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": state.info.get("task_type"),
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": kv_heads * head_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": kv_heads,
        "num_layers": n_layers,
        "encoder_hidden_size": config.projection_dim or kv_heads * head_dim,
        "prefix_projection": False,  # the export holds the folded, flat table
        "inference_mode": True,
        "modules_to_save": config.modules_to_save,
        "base_model_name_or_path": state.base_model_name,
    }


def from_peft_config(data: dict[str, Any]) -> PrefixConfig:
    # peft saves the folded table even when it trained with prefix_projection, so import it flat
    return PrefixConfig(
        num_virtual_tokens=data["num_virtual_tokens"], modules_to_save=data.get("modules_to_save")
    )


register_method(
    Method(
        name="prefix",
        inject=inject_prefix,
        folds_into_base=False,
        is_merged=_is_merged,
        remove=_remove,
        set_enabled=_set_enabled,
        set_active=_set_active,
        merge=_merge,
        unmerge=_unmerge,
        peft_type="PREFIX_TUNING",
        to_peft_config=to_peft_config,
        from_peft_config=from_peft_config,
        to_peft_key=lambda k: k,
        from_peft_key=lambda k: k,
        prepare_export=prepare_export,
        prepare_import=prepare_import,
    )
)
