r"""Mixed-batch multi-adapter inference: every row of a batch runs its own adapter, in one pass.

::

    out = model(**batch, adapter_names=["fr", "de", "__base__", "fr"])       # one name per row
    ids = model.generate(**batch, adapter_names=["fr", "de", "__base__", "fr"], max_new_tokens=20)

Row m routed to adapter a(m) computes exactly what it would compute alone with only a(m) active
(``"__base__"``: no adapter). Per adapted linear layer, with one dense base GEMM for the whole batch::

    h_m = W x_m + b + s_a · (x_m A_aᵀ) B_aᵀ          LoRA (AdaLoRA: A_a ← Q_a ⊙ λ_a, B_a = P_a)

**Routing** (:mod:`peftlab.serving.hooks`). A forward pre-hook on the model pops ``adapter_names``
and sets one :class:`Router` on every :class:`~peftlab.core.layer.AdapterLayer` (``layer.router``); the
router sorts the rows by adapter
once per forward (segments of rows with the same adapter), and every layer shares it. A forward
hook clears it again. ``generate`` gets a per-instance wrapper that takes ``adapter_names`` (one per
input row) and routes every forward of the generation; rows that ``generate`` repeats (beams,
``num_return_sequences``) repeat their adapter (``repeat_interleave``), which also holds after beam
reordering, because beam k of input i always sits at row i·beams + k.

**LoRA part.** Each layer stacks its LoRA/AdaLoRA slots into two tables padded to the largest rank
R, ``A_tab (n, R, d_in)`` and ``B_tab (n, R, d_out)`` (``B_tab[a] = s_a B_aᵀ``, zero past r_a, a zero
row last for "no adapter here"), rebuilt only when an adapter changes (the used adapters' tensor version
counters and storage are checked once per call or per ``generate``, see :func:`peftlab.serving.hooks.refresh`), so all
adapters together are one shrink ``t = x A_aᵀ`` and one expand ``y += t B_tab[a]``:

* CUDA: the Triton SGMV pair (:mod:`peftlab.kernels.sgmv`, one launch for every segment) for prefill,
  BGMV (A, B gathered per row) for decode with one token per row;
* CPU (and CUDA without Triton): no loop over adapters either. Either the segments are padded into
  a ``(n_used, L_max·T, d_in)`` block for two ``bmm`` s and ``index_add_`` back, or every row gathers
  its own tables for two ``bmm`` s, whichever moves fewer numbers
  (n_used·(L_max·T + 1) against B·(T + 2), counted in units of r·(d_in + d_out)).

**Other adapters.** Bottleneck adapters and ``modules_to_save`` head copies run per segment on their
rows. Adapters that adapt the module's parameters (MoE expert stacks, routers; not ``nn.MultiheadAttention``) run
the base module once per group of rows sharing its adapted weights (:mod:`peftlab.serving.param_rows`; also
when the module sees the rows flattened to (batch·T) tokens, as MoE experts do). Prefix tuning: the prefixes
of the rows' adapters are stacked into one per-row table padded to the longest prefix, with a per-row mask
over the padded prefix columns and per-row position shifts (the prefix method's routing hooks, :mod:`peftlab.methods.prefix.mixed_rows`).

In training mode with gradients on, the layers take the differentiable path of
:mod:`peftlab.serving.train_rows` instead (tables stacked from the parameters per forward, every row's
dropout from its job's own random stream). A model with a merged adapter is refused (its update is in
the base weights every row shares). Slot weights from :func:`peftlab.set_active_adapters` do not apply: a row
runs its adapter with weight 1, as it would alone.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from ..kernels import triton_available
from . import param_rows, train_rows

BASE = "__base__"
ROUTING_ATTR = "_peftlab_mixed"
LAYER_TABLES_ATTR = "_peftlab_mixed_tables"
LAYER_PLAN_ATTR = "_peftlab_mixed_plan"
_uids = itertools.count()


# ---- the router: one sort per forward, shared by every layer ----------------------------------------


class Router:
    """Which adapter each row of the current batch runs, grouped into segments.

    Attributes:
        names: one adapter name per row (``"__base__"``: none); batch: the number of rows.
        adapters: the distinct adapters used, in first-appearance order (index j = segment j).
        row_adapter: (batch,) long, index into ``adapters`` per row, -1 for base rows (CPU).
        order: the rows sorted by adapter (stable; base rows excluded); counts, starts: (n_used,).
        version: the adapter version the router was made for (layers rebuild stale tables).
    """

    def __init__(self, names: Sequence[str], version: int) -> None:
        self.uid = next(_uids)
        self.names = tuple(names)
        self.batch = len(self.names)
        self.version = version
        self.adapters = list(dict.fromkeys(n for n in self.names if n != BASE))
        index = {n: j for j, n in enumerate(self.adapters)}
        ids = [index.get(n, -1) for n in self.names]
        self.row_adapter = torch.tensor(ids, dtype=torch.long)
        self.counts = [ids.count(j) for j in range(len(self.adapters))]
        self.starts = list(itertools.accumulate([0] + self.counts[:-1]))
        self.order = [m for j in range(len(self.adapters)) for m in range(self.batch) if ids[m] == j]
        self.max_count = max(self.counts, default=0)
        self.tokens: int | None = None  # the call's sequence length, set per forward (peftlab.serving.param_rows)
        self._cache: dict[tuple, Any] = {}

    def cached(self, key: tuple, make):
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    def rows_of(self, j: int, device) -> torch.Tensor:
        """(count_j,) long: the rows that run adapter j."""
        def make():
            s = self.starts[j]
            return torch.tensor(self.order[s : s + self.counts[j]], dtype=torch.long, device=device)

        return self.cached(("rows", j, str(device)), make)

    def row_index(self, device) -> torch.Tensor:
        return self.cached(("row_adapter", str(device)), lambda: self.row_adapter.to(device))

    def segments(self, tokens: int, device):
        """Token-level SGMV metadata for rows of ``tokens`` tokens: (perm, seg_start, seg_len, max_len).

        Sorted position i holds token perm[i] of the flattened (batch·tokens) input; segment j
        covers [seg_start[j], seg_start[j] + seg_len[j]).
        """
        def make():
            order = torch.tensor(self.order, dtype=torch.long)
            perm = (order[:, None] * tokens + torch.arange(tokens)[None, :]).reshape(-1)
            start = torch.tensor(self.starts, dtype=torch.long) * tokens
            length = torch.tensor(self.counts, dtype=torch.long) * tokens
            to = lambda t: t.to(device=device, dtype=torch.int32)  # noqa: E731
            return to(perm), to(start), to(length), self.max_count * tokens

        return self.cached(("segments", tokens, str(device)), make)

    def padded(self, device):
        """Rows padded per segment to max_count: (pad_rows (n_used·L,), keep (n_valid,), rows (n_valid,)).

        Block j, slot k of the padded layout holds row ``order[starts[j] + k]`` (row 0 where the
        segment is shorter: computed, then dropped via ``keep``).
        """
        def make():
            n, L = len(self.adapters), self.max_count
            pad = torch.zeros(n * L, dtype=torch.long)
            keep, rows = [], []
            for j in range(n):
                for k in range(self.counts[j]):
                    row = self.order[self.starts[j] + k]
                    pad[j * L + k] = row
                    keep.append(j * L + k)
                    rows.append(row)
            as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
            return pad.to(device), as_long(keep), as_long(rows)

        return self.cached(("padded", str(device)), make)

    def forward(self, layer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The routed forward of one :class:`~peftlab.core.layer.AdapterLayer` (see :func:`mixed_forward`)."""
        return mixed_forward(layer, x, *args, **kwargs)

    def use_segments(self, tokens: int) -> bool:
        """Padded segments (True) or per-row gathered tables (False), whichever moves fewer numbers."""
        n = len(self.adapters)
        return n * (self.max_count * tokens + 1) <= self.batch * (tokens + 2)


# ---- per-layer stacked tables ----------------------------------------------------------------------


def is_lora_like(slot) -> bool:
    """Whether the slot's contribution is s·(x Aᵀ) Bᵀ (it answers ``low_rank_factors()``), i.e. it goes into
    the stacked tables."""
    return slot.low_rank_factors() is not None


class LayerTables:
    """One layer's LoRA-like slots stacked (see the module docstring); a zero adapter sits last.

    Attributes:
        names: slot names in table order; a: (n + 1, R, d_in); b: (n + 1, R, d_out) = s·Bᵀ;
        ranks: (n + 1,) int32 (0 for the zero row); key: (version, device, dtype) it was built for.
    """

    def __init__(self, layer, key: tuple, device, dtype) -> None:
        self.key = key
        entries = [(name, factors) for name, slot in layer.slots.items() if (factors := slot.low_rank_factors()) is not None]
        self.names = [name for name, _ in entries]
        self.index = {name: i for i, name in enumerate(self.names)}
        r_max = max((f[0].shape[0] for _, f in entries), default=1)
        d_in, d_out = entries[0][1][0].shape[1], entries[0][1][1].shape[0]
        n = len(entries)
        with torch.no_grad():
            self.a = torch.zeros(n + 1, r_max, d_in, device=device, dtype=dtype)
            self.b = torch.zeros(n + 1, r_max, d_out, device=device, dtype=dtype)
            for i, (_, (a, b, s)) in enumerate(entries):
                r = a.shape[0]
                self.a[i, :r] = a.detach().to(device, dtype)
                self.b[i, :r] = (b.detach().float().t() * s).to(device, dtype)
        self.ranks = torch.tensor([f[0].shape[0] for _, f in entries] + [0], dtype=torch.int32, device=device)
        self.per_router: dict[Any, Any] = {}
        self.skip = frozenset(layer.disabled)  # disabled adapters' rows get no LoRA term (the router's version
        # changes with the disabled sets, and the tables with it)

    def for_router(self, router: Router):
        """Indices into this table for the router's adapters: (per used adapter (n_used,), per row (batch,)),
        the zero row n where a row has no adapter here, and the same two with -1 there (for the kernels)."""
        hit = self.per_router.get(router.uid)
        if hit is None:
            zero = len(self.names)
            local = [zero if n in self.skip else self.index.get(n, zero) for n in router.adapters]
            local = torch.tensor(local + [zero], dtype=torch.long)
            per_row = local[router.row_adapter]  # -1 (base) picks the trailing zero entry
            device = self.a.device
            minus = lambda t: torch.where(t == zero, -1, t).to(device)  # noqa: E731
            hit = (local[:-1].to(device), per_row.to(device), minus(local[:-1]), minus(per_row))
            if len(self.per_router) > 8:
                self.per_router.clear()
            self.per_router[router.uid] = hit
        return hit

    def used(self, router: Router):
        """(A, B) of the router's adapters only, (n_used, R, d): the padded-segment path's operands."""
        key = ("used", router.uid)
        hit = self.per_router.get(key)
        if hit is None:
            local = self.for_router(router)[0]
            hit = self.per_router[key] = (self.a.index_select(0, local), self.b.index_select(0, local))
        return hit


def _tables(layer, router: Router, x: torch.Tensor) -> LayerTables:
    """The layer's stacked tables for this router's adapter version, device and compute dtype (cached)."""
    half = x.dtype if (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)) else None
    key = (router.version, x.device, half)
    tables = layer.__dict__.get(LAYER_TABLES_ATTR)
    if tables is None or tables.key != key:
        a0 = next(f for slot in layer.slots.values() if (f := slot.low_rank_factors()) is not None)[0]
        tables = LayerTables(layer, key, x.device, half or a0.dtype)
        layer.__dict__[LAYER_TABLES_ATTR] = tables
    return tables


# ---- the layer forward -----------------------------------------------------------------------------

_warned: set[str] = set()


def _use_triton(layer, x: torch.Tensor) -> bool:
    if "triton" in _warned or not x.is_cuda or any(getattr(s, "use_kernel", "auto") == "torch" for s in layer.slots.values()):
        return False

    return triton_available()


def _lora_torch(tables: LayerTables, router: Router, x3: torch.Tensor, out3: torch.Tensor) -> None:
    """out3 (B, T, d_out) += the LoRA terms of x3 (B, T, d_in), fp32 (or the tables' dtype)."""
    B, T, d_in = x3.shape
    xin = x3 if x3.dtype == tables.a.dtype else x3.to(tables.a.dtype)
    if router.use_segments(T):
        a_used, b_used = tables.used(router)
        pad, keep, rows = router.padded(x3.device)
        n, L = len(router.adapters), router.max_count
        xp = xin.index_select(0, pad).view(n, L * T, d_in)
        delta = torch.bmm(torch.bmm(xp, a_used.transpose(1, 2)), b_used)  # (n, L·T, d_out)
        delta = delta.view(n * L, T, -1).index_select(0, keep)
        out3.index_add_(0, rows, delta.to(out3.dtype))
    else:
        per_row = tables.for_router(router)[1]
        a_rows, b_rows = tables.a.index_select(0, per_row), tables.b.index_select(0, per_row)
        out3.add_(torch.bmm(torch.bmm(xin, a_rows.transpose(1, 2)), b_rows).to(out3.dtype))


def _lora_triton(tables: LayerTables, router: Router, x2: torch.Tensor, y2: torch.Tensor, tokens: int) -> None:
    from ..kernels import sgmv

    _, _, local, per_row = tables.for_router(router)
    if tokens == 1:  # decode: one token per row, every row gathers its adapter (BGMV)
        t = sgmv.bgmv_shrink(x2, tables.a, per_row, tables.ranks)
        sgmv.bgmv_expand(y2, t, tables.b, per_row, tables.ranks)
        return
    perm, start, length, max_len = router.segments(tokens, x2.device)
    t = sgmv.sgmv_shrink(x2, tables.a, start, length, local, max_len, perm, tables.ranks)
    sgmv.sgmv_expand(y2, t, tables.b, start, length, local, max_len, perm, tables.ranks)


def _add_lora(layer, router: Router, x: torch.Tensor, result: torch.Tensor, triton: bool) -> torch.Tensor:
    tables = _tables(layer, router, x)
    B = x.shape[0]
    d_in, d_out = x.shape[-1], result.shape[-1]
    tokens = x.numel() // (B * d_in) if B else 0
    # add in fp32 when the output is half: one rounding, as the single-adapter path does
    out = result if result.dtype == tables.a.dtype or x.is_cuda else result.to(tables.a.dtype)
    if triton and out.is_contiguous():
        try:
            _lora_triton(tables, router, x.reshape(B * tokens, d_in).contiguous(), out.view(B * tokens, d_out), tokens)
            return out
        except Exception as exc:  # noqa: BLE001 - a compile/launch failure falls back to torch, once loudly
            _warned.add("triton")  # and the kernels stay off for the process
            warnings.warn(f"mixed-batch Triton kernels failed ({type(exc).__name__}: {exc}); using torch from now on",
                          stacklevel=3)
            layer.__dict__.pop(LAYER_PLAN_ATTR, None)
    x3 = x.reshape(B, tokens, d_in)
    out3 = out.view(B, tokens, d_out) if out.is_contiguous() else out.reshape(B, tokens, d_out)
    _lora_torch(tables, router, x3, out3)
    if out3.data_ptr() != out.data_ptr():
        out = out3.reshape(out.shape)
    return out.to(result.dtype) if out.dtype != result.dtype else out


def mixed_forward(layer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of an :class:`~peftlab.core.layer.AdapterLayer` under a mixed batch (``layer.router`` set).

    x: (batch, ..., d_in), row m of which runs ``router.names[m]``. One base call for the whole
    batch; LoRA-like slots through the stacked tables; other slots per segment of rows.
    """
    router: Router = layer.router
    plan = layer.__dict__.get(LAYER_PLAN_ATTR)
    if plan is None or plan[0] != router.uid:
        merged = {n for n, _ in layer.merged_stack}
        present = [(j, layer.slots[n]) for j, n in enumerate(router.adapters)
                   if n in layer.slots and n not in layer.disabled and n not in merged]
        adapting = [(j, s) for j, s in present if s.params]  # they adapt the module's parameters: per group of rows
        present = [(j, s) for j, s in present if not s.params]
        others = [(j, s) for j, s in present if not is_lora_like(s)]
        lora = len(others) < len(present)
        plan = (router.uid, lora, others, lora and _use_triton(layer, x), adapting)
        layer.__dict__[LAYER_PLAN_ATTR] = plan
    _, lora, others, triton, adapting = plan
    if not lora and not others and not adapting:  # none of the batch's adapters is here: the base for every row
        return layer.base_layer(x, *args, **kwargs)
    if not adapting and x.shape[0] != router.batch:
        raise RuntimeError(
            f"mixed batch: a layer got {x.shape[0]} rows but adapter_names routes {router.batch}; "
            f"layers must see the batch dimension first"
        )
    train = layer.training and torch.is_grad_enabled()
    if (lora and not others and not adapting and not args and not kwargs and len(router.adapters) == 1
            and router.counts[0] == router.batch):
        # every row runs the same adapter: the single-adapter fused path (no gather, no stacked tables)
        slot = layer.slots.get(router.adapters[0])
        with train_rows.job_rng(router, router.adapters[0], layer) if train else contextlib.nullcontext():
            out = slot.fused_forward(x, 1.0) if slot is not None else None
        if out is not None:
            return out
    if adapting:  # the base module once per group of rows sharing its adapted parameters
        result = param_rows.grouped_forward(layer, router, x, args, kwargs, adapting)
        if not lora and not others:
            return result
        if x.shape[0] != router.batch:
            raise RuntimeError(
                f"mixed batch: {type(layer.base_layer).__name__} got {x.shape[0]} entries for {router.batch} rows and "
                f"holds adapters on its output beside adapters on its parameters; run them in separate calls"
            )
    else:
        result = None
    if train:  # differentiable tables, per-job random streams (peftlab.serving.train_rows)
        result = layer.base_layer(x, *args, **kwargs) if result is None else result
        if lora:
            present = [(j, layer.slots[n]) for j, n in enumerate(router.adapters)
                       if n in layer.slots and n not in layer.disabled and is_lora_like(layer.slots[n])]
            result = train_rows.add_lora_train(layer, router, x, result, present, kernels=triton)
        return train_rows.segment_train(layer, router, x, result, others, *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs) if result is None else result
    if lora:
        result = _add_lora(layer, router, x, result, triton)
    for j, slot in others:  # bottleneck adapters, head copies, unknown variants: per segment
        rows = router.rows_of(j, x.device)
        captured = getattr(slot, "captured", None)
        if captured is not None:  # parallel bottleneck: the sublayer input its pre-hook captured
            slot.captured = captured.index_select(0, rows)
        xs = x.index_select(0, rows)
        if slot.replaces_base:
            part = slot.contribute(xs, None, 1.0, *args, **kwargs)
        else:
            part = slot.contribute(xs, result.index_select(0, rows), 1.0)
        result = result.index_copy(0, rows, part.to(result.dtype))
    if others:
        for slot in layer.slots.values():
            if getattr(slot, "captured", None) is not None:
                slot.captured = None
    return result
