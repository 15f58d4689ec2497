"""Where and with which shapes a prefix goes in a model: the attention modules of its language model
(:meth:`~peftlab.core.structure.Structure.main`), the table's layer count, key/value heads and head dim (one
width for every layer, as HF PEFT's prefix table has: the widest layer's, narrower layers read a slice of it;
Swin's stages, which HF PEFT can't size: the envelope of their widths), and whether the prefix reaches attention
through transformers' attention interface or, on encoder-decoder models, through the decoder's KV cache."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from ...core.structure import structure
from ...util.errors import TargetError


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _uses_attention_interface(module: nn.Module) -> bool:
    import sys

    return "ALL_ATTENTION_FUNCTIONS" in vars(sys.modules.get(type(module).__module__, object()))


@dataclass
class Geometry:
    """How a prefix reaches a model.

    ``mode``: "interface" (decoder-only and encoder models: every self-attention prepends its
    layer's prefix through :mod:`.prefix_attention`) or "cache" (encoder-decoder models: the
    decoder's self-attention KV cache starts with the prefix, exactly as HF PEFT passes it).
    ``n_layers``: L, the table's layer count; ``attention``: the modules that get a prefix (interface
    mode); ``rows(i)``: the table rows (K, V) of attention layer i; ``submodules``: HF PEFT's
    ``num_transformer_submodules``; ``sources``: per attention layer, the layer whose rows it reads.
    """

    mode: str
    n_layers: int
    kv_heads: int
    head_dim: int
    attention: list
    decoder_layers: int = 0
    submodules: int = 1
    #: per attention layer, the layer whose rows it reads (itself; a KV-shared layer: the layer it reads from)
    sources: list | None = None
    #: the module whose ``position_ids`` move past the prefix: "" (the model) or a VLM's language model, which
    #: gets the positions its VLM computes (PaliGemma counts from 1, Qwen2-VL's are multimodal)
    positions_at: str = ""
    #: "cache" mode on a decoder-only model (BLOOM): the cache is the model's own, and its attention mask gets the
    #: prefix columns
    decoder_only: bool = False

    def rows(self, i: int) -> tuple[int, int]:
        if self.submodules == 2:  # HF PEFT repeats the table and reads 4 rows per decoder layer, modulo 2L
            return (4 * i) % (2 * self.n_layers), (4 * i + 1) % (2 * self.n_layers)
        return 2 * i, 2 * i + 1


def _geometry(model: nn.Module, task: str | None = None) -> Geometry:
    """Where and with which shapes a prefix goes in ``model`` (read from :func:`~peftlab.core.structure.structure`)."""
    text = _text_config(model)
    found = structure(model).main()  # a VLM's language model only, as HF PEFT
    selfs = found.attention("self")
    if not selfs:
        raise TargetError(
            f"prefix tuning can't find attention layers in {type(model).__name__}: no repeated blocks with an attention "
            f"module (q/k/v or fused qkv projections)"
            + (", its blocks mix tokens without attention (convolutions)" if found.blocks else "")
            + "; a prefix is keys and values prepended to attention, in HF PEFT too"
        )
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    per_stage = not isinstance(heads, int) or not isinstance(hidden, int)
    if per_stage and not all(_module_width(model, a) for a in selfs):
        raise TargetError(
            f"prefix tuning can't size a prefix for {type(model).__name__}: its config has no single "
            f"num_attention_heads and hidden_size (got {heads!r}, {hidden!r}), and its attention modules don't say "
            f"their own head_dim and key width"
        )
    if any(a.kv for a in selfs):
        raise TargetError(
            f"prefix tuning can't prefix the multi-head latent attention of {type(model).__name__}: its keys "
            f"(qk_nope_head_dim + qk_rope_head_dim wide) and values (v_head_dim wide) differ in width from each other "
            f"and from hidden_size / num_attention_heads, the one width HF PEFT's prefix (and this table) gives both"
        )
    modules = [model.get_submodule(a.path) for a in selfs]
    if found.attention("cross"):  # encoder-decoder: the decoder's self-attention, through its KV cache (as HF PEFT)
        params = inspect.signature(type(model).forward).parameters
        if "cache" not in params and "past_key_values" not in params:
            raise TargetError(
                f"prefix tuning can't reach the decoder of {type(model).__name__}: on encoder-decoder models the prefix "
                f"goes into the decoder's self-attention KV cache (as in HF PEFT), and this model's forward takes no cache"
            )
        if per_stage:
            raise TargetError(
                f"prefix tuning can't size the decoder prefix of {type(model).__name__}: its config has no single "
                f"num_attention_heads and hidden_size (got {heads!r}, {hidden!r})"
            )
        decoder_layers = sum(any(a.kind == "cross" for a in b.attention) for b in found.blocks)
        n_layers = getattr(text, "num_hidden_layers", None) or getattr(text, "num_layers", None) or decoder_layers
        return Geometry(
            "cache", n_layers, heads, hidden // heads, [], decoder_layers=decoder_layers,
            submodules=2 if task == "SEQ_2_SEQ_LM" or (task is None and getattr(text, "is_encoder_decoder", False)) else 1,
        )  # fmt: skip
    bad = sorted({type(m).__name__ for m in modules if not _uses_attention_interface(m)})
    cache_heads = None if (per_stage or not bad or not _takes_cache(model)) else _cache_heads(text)
    if cache_heads is not None:
        # attention computed by the model itself (BLOOM's ALiBi) but a forward that takes a KV cache: the prefix
        # starts the cache, as HF PEFT passes it (and the attention mask gets n leading columns)
        return Geometry(
            "cache", len(modules), cache_heads, hidden // heads, [], decoder_layers=len(modules), decoder_only=True
        )
    if bad:
        if not _takes_cache(model):
            cache_note = ", and its forward takes no KV cache to start with the prefix (HF PEFT's route)"
        elif per_stage:
            cache_note = ", and its stages differ in width, where HF PEFT's cache route has one width for every layer"
        else:
            cache_note = (
                ", and the KV cache its forward takes holds keys with fewer heads than its queries (multi-query), "
                "unlike the cache HF PEFT's prefix fills (one head per query head)"
            )
        raise TargetError(
            f"prefix tuning can't reach the attention of {type(model).__name__}: {', '.join(bad)} computes attention "
            f"itself (ALiBi / disentangled position terms / its own kernels) instead of calling transformers' attention "
            f"interface, where peftlab prepends the prefix keys and values" + cache_note
        )
    sources = _kv_sources(model, selfs)
    layers = [selfs[j] for j in sources]
    if per_stage:
        kv_heads, head_dim = _stage_envelope(model, layers)
    else:
        kv_heads, head_dim = _kv_geometry(model, text, layers, heads, hidden)
    return Geometry(
        "interface", len(modules), kv_heads, head_dim, modules, sources=sources, positions_at=found.language or ""
    )


def _takes_cache(model: nn.Module) -> bool:
    params = inspect.signature(type(model).forward).parameters
    return "cache" in params or "past_key_values" in params


def _cache_heads(text) -> int | None:
    """Key/value heads of a model whose attention reads the KV cache itself: the config's attention heads when
    its keys have as many (BLOOM), None where they have fewer (Falcon's multi-query / grouped layouts, whose cache
    holds other shapes than HF PEFT's prefix table)."""
    heads = text.num_attention_heads
    kv = _config_value(text, "num_key_value_heads") or _config_value(text, "num_kv_heads") or heads
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv = 1
    return heads if kv == heads else None


def _kv_sources(model: nn.Module, selfs) -> list[int]:
    """For each attention layer, the layer whose prefix rows it reads: itself, or, for a layer without key and
    value projections that reads another layer's keys and values (Gemma-4's KV-shared layers), that layer: the
    last earlier one with its own keys and the same head dim and sliding window (Gemma-4's rule: the last
    non-shared layer of its type), whose keys and values reach it with their prefix in HF PEFT's cache."""
    out: list[int] = []
    for i, site in enumerate(selfs):
        if site.k or site.v or site.qkv or site.kv:
            out.append(i)
            continue
        same = [j for j in range(i) if out[j] == j and _kind(model, selfs[j]) == _kind(model, site)]
        if not same:
            raise TargetError(
                f"prefix tuning can't tell whose keys and values attention layer {i} of {type(model).__name__} reads: "
                f"it has no key/value projections and no earlier layer of its kind (head dim, sliding window) has them"
            )
        out.append(same[-1])
    return out


def _kind(model: nn.Module, site) -> tuple:
    module = model.get_submodule(site.path)
    return getattr(module, "head_dim", None), getattr(module, "sliding_window", None)


def _kv_geometry(model: nn.Module, text, selfs, heads: int, hidden: int) -> tuple[int, int]:
    """(key/value heads, head dim) of the prefix table: read from each attention module (its ``head_dim`` and its
    key projection's width) where it says, else from the config.

    Where layers differ (Gemma-4: the full-attention layers' heads are twice as wide as the sliding layers'), the
    table is HF PEFT's: one width for every layer, that of the layer with the largest head dim (the first such
    layer's key/value heads), and a narrower layer reads the first key/value heads and the first head-dim columns
    of its rows (as HF PEFT slices ``key_states[:, :heads, :, :head_dim]``; see :mod:`.attention`).

    Raises:
        TargetError: a layer has more key/value heads than the widest layer (HF PEFT skips such layers, leaving
            them without a prefix).
    """
    default_dim = _config_value(text, "head_dim") or hidden // heads
    default_kv = _config_value(text, "num_key_value_heads") or heads
    shapes = []
    for site in selfs:
        module = model.get_submodule(site.path)
        dim = getattr(module, "head_dim", None) or default_dim
        kv = default_kv
        if site.k and isinstance(dim, int) and dim:
            out = getattr(model.get_submodule(site.k), "out_features", None)
            kv = out // dim if out else kv
        shapes.append((kv, dim))
    if not shapes:
        return default_kv, default_dim
    widest = max(shapes, key=lambda s: s[1])  # the first layer with the largest head dim
    misfit = [i for i, (kv, dim) in enumerate(shapes) if kv > widest[0] or dim > widest[1]]
    if misfit:
        raise TargetError(
            f"prefix tuning can't give every layer of {type(model).__name__} a prefix: its attention layers differ in "
            f"(key/value heads, head dim), {sorted(set(shapes))}, and layers {misfit} have more key/value heads than the "
            f"widest layers {widest}, whose width HF PEFT gives its one prefix table (it skips those layers, leaving "
            f"them without a prefix)"
        )
    return widest


def _module_width(model: nn.Module, site) -> tuple[int, int] | None:
    """(key/value heads, head dim) an attention module states itself (its ``head_dim`` and its key projection's
    ``out_features``), or None where it doesn't."""
    module = model.get_submodule(site.path)
    dim = getattr(module, "head_dim", None)
    out = getattr(model.get_submodule(site.k), "out_features", None) if site.k else None
    if not isinstance(dim, int) or dim <= 0 or not isinstance(out, int) or out % dim:
        return None
    return out // dim, dim


def _stage_envelope(model: nn.Module, selfs) -> tuple[int, int]:
    """(key/value heads, head dim) of the prefix table of a model whose stages differ in width (Swin: per-stage
    ``num_heads`` and a hidden size that doubles per stage): the most key/value heads and the widest head dim of
    any layer, so every layer reads its own first heads and first head-dim columns (:func:`.attention.fit`).

    HF PEFT has no table for such a model (its prefix reads one ``num_attention_heads`` from the config), so
    there is no layout to match; the envelope gives each layer exactly its own width of trainable rows that
    it reads, plus columns no layer reads (they get no gradient and stay at their initial values).
    """
    widths = [_module_width(model, site) for site in selfs]
    return max(w[0] for w in widths), max(w[1] for w in widths)


def _config_value(config, name: str):
    """``config.<name>``, or None where it is missing or per-layer (transformers raises on a global read of an
    attribute that varies across layers, e.g. Gemma-4's ``head_dim``)."""
    try:
        value = getattr(config, name, None)
    except Exception:  # noqa: BLE001 - AmbiguousGlobalPerLayerAttributeError and kin
        return None
    return value if isinstance(value, int) else None
