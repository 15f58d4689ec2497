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
from ..inject import get_state
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
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ConfigError(
                f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}"
            )
        if self.projection_dim is not None and (
            not isinstance(self.projection_dim, int) or self.projection_dim <= 0
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


def inject_prefix(model: nn.Module, config: PrefixConfig, skip: list[str] = ()) -> dict[str, Any]:
    impl = model.config._attn_implementation or "eager"
    if impl in prefix_attention.ORIGINAL:
        raise ConfigError("this model already carries a prefix adapter; unwrap it first")
    if impl not in SUPPORTED_ATTENTION:
        raise ConfigError(
            f"prefix tuning supports attn_implementation {SUPPORTED_ATTENTION}, the model uses {impl!r}; "
            f"load it with attn_implementation='sdpa'"
        )
    n_layers, kv_heads, head_dim, attn = _geometry(model)
    prefix_attention.register()
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
    name = f"peftlab_prefix_{config.adapter_name}"
    model.add_module(name, encoder)
    holder = prefix_attention.PrefixHolder(config.num_virtual_tokens)
    for module in attn:
        module._peftlab_prefix = holder
    model.config._attn_implementation = f"peftlab_prefix_{impl}"

    def pre_hook(mod, args, kwargs):
        if not holder.enabled:
            holder.kv = None
            return args, kwargs
        enc = getattr(mod, name)
        table = holder.folded if holder.folded is not None else enc()
        holder.kv = table.view(enc.n, n_layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)
        return args, _shift_positions(args, kwargs, holder.n_prefix)

    hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return {
        "targets": [],
        "shapes": {},
        "info": {
            "hooks": [hook],
            "holder": holder,
            "attn_impl": impl,
            "encoder": name,
            "geometry": (n_layers, kv_heads, head_dim),
        },
    }


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


def _remove(model: nn.Module, adapter_name: str) -> None:
    state = get_state(model, adapter_name)
    for hook in state.info["hooks"]:
        hook.remove()
    for module in model.modules():
        if getattr(module, "_peftlab_prefix", None) is state.info["holder"]:
            del module._peftlab_prefix
    model.config._attn_implementation = state.info["attn_impl"]
    delattr(model, state.info["encoder"])


def _set_enabled(model: nn.Module, adapter_name: str, enabled: bool) -> None:
    get_state(model, adapter_name).info["holder"].enabled = enabled


@torch.no_grad()
def _merge(model: nn.Module, state) -> None:
    """Fold the reparameterisation MLP into a flat table used for inference (the MLP stays for unmerge)."""
    holder = state.info["holder"]
    if holder.folded is not None:
        raise MergeError(
            f"prefix adapter {state.config.adapter_name!r} is already merged; call unmerge() first"
        )
    holder.folded = getattr(model, state.info["encoder"])().detach().clone()


def _unmerge(model: nn.Module, state) -> None:
    holder = state.info["holder"]
    if holder.folded is None:
        raise MergeError(f"prefix adapter {state.config.adapter_name!r} is not merged; nothing to unmerge")
    holder.folded = None


def _is_merged(state) -> bool:
    return state.info["holder"].folded is not None


# ---- HF PEFT interop: one tensor, `prompt_embeddings` = the flat table (n, L·2·d_kv) -------------


def prepare_export(model, tensors: dict, state) -> dict:
    holder = state.info["holder"]
    with torch.no_grad():
        table = holder.folded if holder.folded is not None else getattr(model, state.info["encoder"])()
    return {"prompt_embeddings": table.detach()}


def prepare_import(model, tensors: dict, state) -> dict:
    return {f"{state.info['encoder']}.embedding.weight": tensors["prompt_embeddings"]}


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
