r"""Prefix tuning in a mixed batch: one prefix (or none) per row, in one attention call.

The prefixes of the rows' adapters are stacked into one per-row table padded to the longest prefix
(:func:`prefix_rows`), with a per-row mask over the padded prefix columns and per-row position shifts
(:func:`shift_positions`); the attention wrapper of :mod:`peftlab.methods.prefix.attention` reads
them through :meth:`PrefixRows.extend`. Routing itself lives in :mod:`peftlab.serving`.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ...core.state import adapters
from ...util.errors import ConfigError
from .attention import PREFIX_HOLDER_ATTR, PREFIX_TABLES_ATTR, fit


class PrefixRows:
    """Per-row prefixes for the attention wrapper of :mod:`peftlab.methods.prefix.attention`.

    Attributes:
        kv: (n_layers, 2, batch, kv_heads, n_max, head_dim) or None (no row has a prefix);
        mask: (batch, n_max) bool, True on the prefix columns a row attends (its first n_a);
        shift: (batch,) long, the prefix length n_a of each row (its real tokens start at n_a).
    """

    def __init__(self, kv, mask, shift) -> None:
        self.kv, self.mask, self.shift = kv, mask, shift

    def extend(self, module, query, key, value, attention_mask):
        """([P_K ; K], [P_V ; V], [prefix columns | mask]) for one attention layer, per row."""
        if self.kv is None:
            return key, value, attention_mask
        batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
        layer = getattr(module, "_peftlab_prefix_layer", None)
        layer = module.layer_idx if layer is None else layer
        pk = fit(self.kv[layer, 0].to(key.dtype), key)  # a narrower layer (Gemma-4's sliding ones): its slice
        pv = fit(self.kv[layer, 1].to(value.dtype), value)
        if pk.shape[0] != batch:
            raise RuntimeError(f"mixed batch: prefix rows for {pk.shape[0]} rows, attention got {batch}")
        n = pk.shape[2]
        if attention_mask is None:
            if getattr(module, "is_causal", False) and q_len > 1:
                i = torch.arange(q_len, device=query.device).view(-1, 1) + (k_len - q_len)
                attention_mask = (torch.arange(k_len, device=query.device).view(1, -1) <= i).view(1, 1, q_len, k_len)
            else:
                attention_mask = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=query.device)
        attention_mask = attention_mask[..., :k_len]
        heads = attention_mask.shape[1]
        cols = self.mask.view(batch, 1, 1, n).expand(batch, heads, attention_mask.shape[2], n)
        if attention_mask.dtype != torch.bool:
            cols = torch.zeros(cols.shape, dtype=attention_mask.dtype, device=cols.device).masked_fill(
                ~cols, torch.finfo(attention_mask.dtype).min
            )
        full = attention_mask.expand(batch, heads, attention_mask.shape[2], k_len)
        attention_mask = torch.cat([cols, full], dim=-1)
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2), attention_mask


def prefix_rows(model: nn.Module, router, device, grad: bool = False) -> PrefixRows:
    """The stacked per-row prefix table of a mixed batch (``router``: its :class:`peftlab.serving.router.Router`).

    ``grad``: build it differentiably from the prefix tables (training: each row's gradient reaches its own
    adapter's table only, through the per-row gather); else a detached copy.
    """
    holder = getattr(model, PREFIX_HOLDER_ATTR)
    states = adapters(model)
    prefixed = [n for n in router.adapters if states[n].config.method == "prefix" and n not in holder.disabled]
    shift = torch.zeros(router.batch, dtype=torch.long)
    if not prefixed:
        return PrefixRows(None, None, shift.to(device))
    cached = [n for n in prefixed if states[n].info.get("mode", "interface") != "interface"]
    if cached:
        raise ConfigError(
            f"prefix adapter(s) {cached} reach {type(model).__name__} through its (decoder's) KV cache (encoder-decoder "
            f"models, and models whose attention reads the cache itself, as BLOOM's), which a mixed batch cannot fill "
            f"per row; run them in their own batch with set_active_adapters"
        )
    tables = getattr(model, PREFIX_TABLES_ATTR)
    with torch.enable_grad() if grad else torch.no_grad():
        kvs = []
        for name in prefixed:
            enc = tables[name]
            n_layers, kv_heads, head_dim = states[name].info["geometry"]
            table = holder.folded[name] if name in holder.folded else enc()
            kvs.append(table.view(enc.n, n_layers, 2, kv_heads, head_dim))
        n_max = max(kv.shape[0] for kv in kvs)
        stack = torch.zeros(len(kvs) + 1, n_max, *kvs[0].shape[1:], dtype=kvs[0].dtype, device=kvs[0].device)
        for i, kv in enumerate(kvs):
            stack[i, : kv.shape[0]] = kv
    lengths = torch.tensor([kv.shape[0] for kv in kvs] + [0])
    which = torch.tensor([prefixed.index(n) if n in prefixed else len(prefixed) for n in router.names])
    shift = lengths[which]
    kv = stack[which.to(stack.device)].permute(2, 3, 0, 4, 1, 5).contiguous()  # (L, 2, batch, kvh, n_max, hd)
    mask = torch.arange(n_max)[None, :] < shift[:, None]
    return PrefixRows(kv.to(device), mask.to(device), shift.to(device))


def shift_positions(args, kwargs: dict, shift: torch.Tensor) -> dict:
    """Real tokens of row m take positions shift[m], shift[m] + 1, ... (its prefix occupies the first)."""
    if kwargs.get("position_ids") is not None:
        return {**kwargs, "position_ids": kwargs["position_ids"] + shift.view(-1, 1)}
    ids = kwargs.get("input_ids", args[0] if args else None)
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    if ref is None:
        return kwargs
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    positions = torch.arange(past, past + ref.shape[1], device=ref.device).view(1, -1) + shift.view(-1, 1)
    return {**kwargs, "position_ids": positions}


# ---- the method's routing hooks (see :class:`peftlab.core.registry.Method`) ----------------------------


def route_rows(model: nn.Module, router, args, kwargs: dict) -> dict:
    """Before a routed forward: give the holder the per-row prefix table and shift the positions."""
    holder = getattr(model, PREFIX_HOLDER_ATTR, None)
    if holder is None:
        return kwargs
    ref = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
    device = ref.device if isinstance(ref, torch.Tensor) else next(model.parameters()).device
    if model.training and torch.is_grad_enabled():  # training: a fresh differentiable table every forward
        rows = prefix_rows(model, router, device, grad=True)
    else:
        rows = router.cached(("prefix", str(device)), lambda: prefix_rows(model, router, device))
    holder.rows = rows
    holder.drop_rows_hook()  # generate's steps and training forwards route again without clearing in between
    if rows.kv is None:
        return kwargs
    at = model.get_submodule(holder.positions_at) if holder.positions_at else model
    if "position_ids" not in inspect.signature(type(at).forward).parameters:
        return kwargs
    if at is model:
        return shift_positions(args, kwargs, rows.shift)
    # a VLM's language model: shift the positions its VLM computes for it (PaliGemma counts from 1, Qwen2-VL's are
    # multimodal, (3, batch, T)), as a single prefix does, once for the whole routed forward
    holder.rows_hook = at.register_forward_pre_hook(
        lambda module, a, kw: (a, shift_positions(a, kw, rows.shift)), with_kwargs=True
    )
    return kwargs


def clear_rows(model: nn.Module) -> None:
    """After a routed forward: the holder forgets the per-row table."""
    holder = getattr(model, PREFIX_HOLDER_ATTR, None)
    if holder is not None:
        holder.rows = None
        holder.drop_rows_hook()


def routing_key(model: nn.Module) -> tuple:
    """What invalidates the stacked prefix tables besides the adapters' own tensors: the disabled prefixes
    and the folded (merged) tables."""
    holder = getattr(model, PREFIX_HOLDER_ATTR, None)
    folded = getattr(holder, "folded", None) or {}
    return (
        tuple(sorted(getattr(holder, "disabled", ()))),
        tuple((name, t.data_ptr(), t._version) for name, t in sorted(folded.items())),
    )
