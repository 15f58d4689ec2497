r"""Prefix tuning (Li & Liang, 2021, arXiv:2101.00190) for decoder and encoder models.

Every attention layer l gets n learned key and value vectors prepended::

    head_i = Attention(x W_q, [P_K^l ; x W_k], [P_V^l ; x W_v])

    P = E                                   (flat: E is n × (L·2·d_kv))
    P = W_2 tanh(W_1 E' + b_1) + b_2        (reparameterised, projection_dim set: E' is n × d_kv)

with d_kv = num_key_value_heads · head_dim (so grouped-query models get KV-head prefixes) and
L the number of layers. Only E (and the MLP) train. ``merge`` folds the MLP into a flat table, so
inference needs no MLP; ``unmerge`` brings the MLP back. The real tokens' positions start at n
(the prefix occupies positions 0..n-1), as in Hugging Face PEFT, whose layout this matches for
export/import; models with learned absolute positions (BERT: 512) have n fewer left for the input,
and a longer input is refused with the count.

Where the prefix goes is read from the model's structure (:func:`peftlab.core.structure.structure`):

* decoder-only and encoder models: every self-attention layer, through transformers' attention
  interface (:mod:`peftlab.methods.prefix.attention`); fused qkv projections (GPT-2 ``c_attn``,
  GPT-NeoX ``query_key_value``, Phi-3 ``qkv_proj``) are split before that interface. Models whose
  attention bypasses the interface (BLOOM's ALiBi, Falcon, DeBERTa-v2's disentangled attention) are
  refused with that reason.
* encoder-decoder models (T5, BART): as HF PEFT, the decoder's self-attention KV cache starts with
  the prefix (the encoder and cross-attention get none: HF PEFT's seq2seq path hands the cross-attention
  an empty cache). For ``SEQ_2_SEQ_LM`` HF PEFT repeats the L-layer table and reads decoder layer i's
  keys and values from rows 4i and 4i+1 modulo 2L (so with an even L, layers i and i + L/2 share
  rows); we read the same rows, so exports and imports reproduce HF PEFT's logits exactly. Cached and
  uncached generation agree (generate's cache positions are moved past the prefix).

Each layer's prefix is computed in that layer's attention call (for a reparameterised prefix the MLP
restricted to the layer's rows), so re-entrant activation checkpointing recomputes layers independently
(the input embeddings are made to require grad, as HF PEFT does, so the first block's prefix gets its
gradient). Encoder-decoder prefixes refuse gradient checkpointing: transformers drops the decoder's
cache when checkpointing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.config import PeftConfig
from ...core.layer import SLOT_ROLES
from ...core.registry import Injected, Method, register_method
from ...core.structure import task_type
from ...util.errors import ConfigError, MergeError, TargetError
from . import attention as prefix_attention
from . import estimate
from .attention import PREFIX_HOLDER_ATTR, PREFIX_TABLES_ATTR
from .geometry import Geometry, _geometry, _text_config
from .mixed_rows import clear_rows, route_rows, routing_key

SUPPORTED_ATTENTION = ("sdpa", "eager")


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

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` of the table, (n, stop - start), computing only those outputs of the MLP."""
        if self.transform is None:
            return self.embedding.weight[:, start:stop]
        first, act, last = self.transform
        hidden = act(first(self.embedding.weight))
        return nn.functional.linear(hidden, last.weight[start:stop], last.bias[start:stop])


SLOT_ROLES.add(PREFIX_TABLES_ATTR)


def _position_limit(model: nn.Module) -> int | None:
    """Positions a model with learned absolute position embeddings has (None: relative/rotary, no hard limit)."""
    text = _text_config(model)
    limit = getattr(text, "max_position_embeddings", None)
    if limit is None or getattr(text, "position_embedding_type", "absolute") != "absolute":
        return None
    for path, module in model.named_modules():
        last = path.rsplit(".", 1)[-1]
        if isinstance(module, nn.Embedding) and ("pos" in last or last == "wpe"):
            return limit
    return None


def inject_prefix(model: nn.Module, config: PrefixConfig, txn) -> dict[str, Any]:
    """Add a prefix table ``peftlab_prefix.<name>`` and a pre-hook that feeds it to attention when it runs."""
    if getattr(model, "config", None) is None:
        raise TargetError(
            f"prefix tuning needs a transformers model with a .config (attention geometry, attn_implementation); "
            f"{type(model).__name__} has none"
        )

    task = task_type(model)
    holder = getattr(model, PREFIX_HOLDER_ATTR, None)
    geo = _geometry(model, task)
    if holder is None:
        impl = model.config._attn_implementation or "eager"
        holder = prefix_attention.PrefixHolder(config.num_virtual_tokens)
        if geo.mode == "interface":
            if impl not in SUPPORTED_ATTENTION:
                raise ConfigError(
                    f"prefix tuning supports attn_implementation {SUPPORTED_ATTENTION}, the model uses {impl!r}; "
                    f"load it with attn_implementation='sdpa'"
                )
            prefix_attention.register()
            for i, module in enumerate(geo.attention):
                module._peftlab_prefix = holder
                module._peftlab_prefix_layer = geo.sources[i] if geo.sources else i
            model.config._attn_implementation = f"peftlab_prefix_{impl}"
        setattr(model, PREFIX_HOLDER_ATTR, holder)
        txn.undo.append(lambda: _detach_holder(model, impl))
    else:
        impl = prefix_attention.ORIGINAL.get(model.config._attn_implementation, model.config._attn_implementation)
    weight = next(model.parameters())
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    d_kv = geo.kv_heads * geo.head_dim
    encoder = PrefixEncoder(
        config.num_virtual_tokens, geo.n_layers, d_kv, config.projection_dim, device=weight.device, dtype=dtype
    )
    for p in encoder.parameters():
        p.requires_grad_(True)
    tables = getattr(model, PREFIX_TABLES_ATTR, None)
    if tables is None:
        tables = nn.ModuleDict()
        model.add_module(PREFIX_TABLES_ATTR, tables)
    tables[config.adapter_name] = encoder
    txn.undo.append(lambda: _drop_table(model, config.adapter_name))
    name = config.adapter_name
    limit = _position_limit(model) if geo.mode == "interface" else None
    # models whose forward takes no position_ids (DistilBERT) keep positions 0..T-1 for the real tokens; a VLM's
    # language model moves the positions its VLM gives it (as HF PEFT's cache of n tokens makes the VLM count)
    shift_at = model.get_submodule(geo.positions_at) if geo.positions_at else model
    holder.positions_at = geo.positions_at  # where a mixed batch shifts its rows' positions too
    takes_positions = "position_ids" in inspect.signature(type(shift_at).forward).parameters
    n, kvh, hd = encoder.n, geo.kv_heads, geo.head_dim

    def layer_kv(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of attention layer i, each (kv_heads, n, head_dim)."""
        k_row, v_row = geo.rows(i)
        folded = holder.folded.get(name)
        if folded is not None:
            k, v = folded[:, k_row * d_kv : (k_row + 1) * d_kv], folded[:, v_row * d_kv : (v_row + 1) * d_kv]
        elif v_row == k_row + 1:
            kv = getattr(model, PREFIX_TABLES_ATTR)[name].rows(k_row * d_kv, (v_row + 1) * d_kv)
            k, v = kv[:, :d_kv], kv[:, d_kv:]
        else:
            enc = getattr(model, PREFIX_TABLES_ATTR)[name]
            k, v = enc.rows(k_row * d_kv, (k_row + 1) * d_kv), enc.rows(v_row * d_kv, (v_row + 1) * d_kv)
        return k.view(n, kvh, hd).transpose(0, 1), v.view(n, kvh, hd).transpose(0, 1)

    def pre_hook(mod, args, kwargs):
        if getattr(holder, "rows", None) is not None or holder.running() != name:  # rows: a mixed batch routes
            return args, kwargs
        holder.n_prefix = n
        checkpointing = mod.training and torch.is_grad_enabled() and getattr(mod, "is_gradient_checkpointing", False)
        if geo.mode == "cache":
            if checkpointing:
                raise ConfigError(
                    f"prefix tuning on {type(mod).__name__} can't train with gradient checkpointing: "
                    f"the prefix lives in the (decoder's) KV cache, which transformers drops when checkpointing "
                    f"(cache=None); call model.gradient_checkpointing_disable() to train the prefix"
                )
            return args, _fill_cache(model, geo, layer_kv, args, kwargs)
        if checkpointing and getattr(mod, "_require_grads_hook", None) is None:
            # re-entrant checkpointing gives gradients only through inputs that require them: without this the
            # first checkpointed block's prefix would get no gradient (as HF PEFT, make the embeddings' output require grad)
            mod.enable_input_require_grads()
        holder.layer_kv = layer_kv
        if takes_positions and shift_at is model:
            kwargs = _shift_positions(args, kwargs, n)
        _check_positions(kwargs, n, limit)
        return args, kwargs

    def shift_hook(mod, args, kwargs):
        if getattr(holder, "rows", None) is not None or holder.running() != name:
            return args, kwargs
        return args, _shift_positions(args, kwargs, n)

    txn.hook(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
    if takes_positions and shift_at is not model:
        txn.hook(shift_at.register_forward_pre_hook(shift_hook, with_kwargs=True))
    return Injected(
        targets=[],
        shapes={},
        owned_modules= [f"{PREFIX_TABLES_ATTR}.{name}"],
        live= {"holder": holder},
        info={
            "attn_impl": impl,
            "geometry": [geo.n_layers, geo.kv_heads, geo.head_dim],
            "mode": geo.mode,
            "submodules": geo.submodules,
            "task_type": task,
        },
    )


def _check_positions(kwargs: dict, n_prefix: int, limit: int | None) -> None:
    """Refuse inputs that would run past a learned position table once the prefix takes positions 0..n-1."""
    positions = kwargs.get("position_ids")
    if limit is None or positions is None or positions.numel() == 0:
        return
    last = int(positions.max())
    if last >= limit:
        length = positions.shape[-1]
        raise ConfigError(
            f"prefix tuning puts the real tokens after the {n_prefix} virtual tokens (positions {n_prefix}..{last}), "
            f"but this model has only {limit} learned positions (max_position_embeddings): inputs may have at most "
            f"{limit - n_prefix} tokens with this prefix, got {length}. Truncate inputs to {limit - n_prefix} tokens "
            f"or use fewer num_virtual_tokens"
        )


def _cache_kwarg(model: nn.Module) -> str:
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _fill_cache(model: nn.Module, geo: Geometry, layer_kv, args, kwargs) -> dict:
    """Encoder-decoder models: start the decoder's self-attention cache with the prefix (as HF PEFT's get_prompt)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    key = "cache" if "cache" in kwargs else "past_key_values" if "past_key_values" in kwargs else _cache_kwarg(model)
    cache = kwargs.get(key)
    n = getattr(cache, "_peftlab_prefix", 0)
    if kwargs.get("use_cache") is False and n:
        cache, n = None, 0  # uncached decoding hands back the cache we made for the previous step: start afresh
    if cache is not None and cache.get_seq_length() > 0:
        # a later generation step: the cache already starts with the prefix; generate counts positions
        # from the real tokens only, so move its cache_position past the prefix
        if n and kwargs.get("cache_position") is not None:
            kwargs = {**kwargs, "cache_position": kwargs["cache_position"] + n}
        return _prefix_columns(geo, kwargs, n) if n else kwargs
    ref = kwargs.get("input_ids", args[0] if args else None)
    for k in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "labels"):
        if ref is None:
            ref = kwargs.get(k)
    if ref is None and kwargs.get("encoder_outputs") is not None:
        ref = kwargs["encoder_outputs"][0]
    batch = ref.shape[0]
    if cache is None:
        cache = DynamicCache() if geo.decoder_only else EncoderDecoderCache(DynamicCache(), DynamicCache())
    self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    for i in range(min(geo.n_layers, geo.decoder_layers)):
        k, v = layer_kv(i)
        self_cache.update(k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1), i)
    if isinstance(cache, EncoderDecoderCache):
        for layer in list(cache.is_updated):
            cache.is_updated[layer] = False
    cache._peftlab_prefix = self_cache.get_seq_length()
    out = {**{k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}, key: cache}
    if out.get("cache_position") is not None:  # computed by generate before the prefix was in the cache
        out["cache_position"] = out["cache_position"] + cache._peftlab_prefix
    return _prefix_columns(geo, out, cache._peftlab_prefix)


def _prefix_columns(geo: Geometry, kwargs: dict, n: int) -> dict:
    """A decoder-only model's attention mask gets n leading ones for the prefix in its cache (as HF PEFT prepends
    them; BLOOM also builds its ALiBi offsets from this mask). An encoder-decoder's ``attention_mask`` is the
    encoder's, which the prefix does not touch."""
    mask = kwargs.get("attention_mask")
    if not geo.decoder_only or mask is None or mask.dim() != 2:
        return kwargs
    ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
    return {**kwargs, "attention_mask": torch.cat([ones, mask], dim=1)}


def _drop_table(model: nn.Module, name: str) -> None:
    tables = getattr(model, PREFIX_TABLES_ATTR, None)
    if tables is not None and name in tables:
        del tables[name]
        if len(tables) == 0:
            delattr(model, PREFIX_TABLES_ATTR)


def _detach_holder(model: nn.Module, impl: str) -> None:
    holder = getattr(model, PREFIX_HOLDER_ATTR, None)
    for module in model.modules():
        if getattr(module, "_peftlab_prefix", None) is holder:
            del module._peftlab_prefix
            module.__dict__.pop("_peftlab_prefix_layer", None)
    if hasattr(model, PREFIX_HOLDER_ATTR):
        delattr(model, PREFIX_HOLDER_ATTR)
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
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    positions = (
        torch.arange(past + n_prefix, past + n_prefix + length, device=ref.device)
        .unsqueeze(0)
        .expand(batch, -1)
    )
    return {**kwargs, "position_ids": positions}


def _holder(model: nn.Module) -> prefix_attention.PrefixHolder:
    return getattr(model, PREFIX_HOLDER_ATTR)


def _remove(model: nn.Module, state) -> None:
    holder = _holder(model)
    holder.active = [n for n in holder.active if n != state.name]
    holder.disabled.discard(state.name)
    holder.folded.pop(state.name, None)
    _drop_table(model, state.name)
    if getattr(model, PREFIX_TABLES_ATTR, None) is None:
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
    holder.folded[state.name] = getattr(model, PREFIX_TABLES_ATTR)[state.name]().detach().clone()


def _unmerge(model: nn.Module, state) -> None:
    holder = _holder(model)
    if state.name not in holder.folded:
        raise MergeError(f"prefix adapter {state.name!r} is not merged; nothing to unmerge")
    del holder.folded[state.name]


def _is_merged(state) -> bool:
    return state.name in state.live.objects["holder"].folded


# ---- HF PEFT interop: one tensor, `prompt_embeddings` = the flat table (n, L·2·d_kv) -------------


def prepare_export(model, tensors: dict, state) -> dict:
    """The table as HF PEFT's ``prompt_embeddings`` (folded: MLP applied); head copies pass through.

    Raises:
        ConfigError: no HF PEFT task fits the model (``task_type`` None: CLIP, SigLIP, ViT, Whisper, Wav2Vec2):
            peft's plain ``PeftModel`` passes no prefix, so it would load the file and compute the base model.
    """
    if task_type(model) is None:
        raise ConfigError(
            f"HF PEFT can't run a prefix on {type(model).__name__}: no PEFT task model takes its inputs (task_type "
            f"None), and peft's plain PeftModel passes no past_key_values, so it would load this export and compute "
            f"the base model; save it with peftlab.save_adapter"
        )
    holder = _holder(model)
    with torch.no_grad():
        table = holder.folded.get(state.name)
        if table is None:
            table = getattr(model, PREFIX_TABLES_ATTR)[state.name]()
    rest = {k: v for k, v in tensors.items() if not k.startswith(f"{PREFIX_TABLES_ATTR}.")}
    return {**rest, "prompt_embeddings": table.detach()}


def prepare_import(model, tensors: dict, state) -> dict:
    rest = {k: v for k, v in tensors.items() if k != "prompt_embeddings"}
    return {**rest, f"{PREFIX_TABLES_ATTR}.embedding.weight": tensors["prompt_embeddings"]}


def to_peft_config(config: PrefixConfig, state) -> dict[str, Any]:
    n_layers, kv_heads, head_dim = state.info["geometry"]
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": state.info.get("task_type"),
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": kv_heads * head_dim,
        "num_transformer_submodules": state.info.get("submodules", 1),
        "num_attention_heads": kv_heads,
        "num_layers": n_layers,
        "encoder_hidden_size": config.projection_dim or kv_heads * head_dim,
        "prefix_projection": False,  # the export holds the folded, flat table
        "inference_mode": True,
        "modules_to_save": config.modules_to_save,
        "base_model_name_or_path": state.base_model_name,
    }


def _to_peft_key(key: str) -> str:
    """``prompt_embeddings`` stays; head tensors (``classifier.weight``) sit under ``base_model.`` in
    HF PEFT's prompt-learning files (no ``.model``, unlike LoRA's)."""
    return key if key == "prompt_embeddings" else f"base_model.{key}"


def _from_peft_key(key: str) -> str:
    return key.removeprefix("base_model.")


def from_peft_config(data: dict[str, Any]) -> PrefixConfig:
    # peft saves the folded table even when it trained with prefix_projection, so import it flat
    return PrefixConfig(
        num_virtual_tokens=data["num_virtual_tokens"], modules_to_save=data.get("modules_to_save")
    )


def examples(adapter_name: str, r: int) -> dict[str, PrefixConfig]:
    """A 3-token prefix, with the reparameterisation MLP for r == 4 and without otherwise."""
    return {"prefix": PrefixConfig(num_virtual_tokens=3, projection_dim=8 if r == 4 else None, adapter_name=adapter_name)}


register_method(
    Method(
        name="prefix",
        config_class=PrefixConfig,
        inject=inject_prefix,
        examples=examples,
        estimate=estimate.RULES,
        folds_into_base=False,
        identity_at_init=False,
        is_merged=_is_merged,
        remove=_remove,
        set_enabled=_set_enabled,
        set_active=_set_active,
        merge=_merge,
        unmerge=_unmerge,
        peft_type="PREFIX_TUNING",
        to_peft_config=to_peft_config,
        from_peft_config=from_peft_config,
        to_peft_key=_to_peft_key,
        from_peft_key=_from_peft_key,
        prepare_export=prepare_export,
        prepare_import=prepare_import,
        route_rows=route_rows,
        clear_rows=clear_rows,
        routing_key=routing_key,
    )
)
