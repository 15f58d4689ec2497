r"""Mixed batches in training: every row trains its own adapter, in one pass over the frozen base.

``model(**batch, adapter_names=names)`` in training mode (with gradients enabled) routes here from
:func:`peftlab.serving.router.mixed_forward`. Per adapted linear layer, row m of job a = a(m)::

    h_m = W x_m + b + c_a s_a · ((x_m ⊙ m_m) A_aᵀ) B_aᵀ          (c_a = 1/(1-p_a), inverted dropout)

**LoRA-like slots** (those answering ``low_rank_factors()``: LoRA, AdaLoRA) are stacked, per forward, into
differentiable tables padded to the largest rank R (a zero entry last, for rows without an adapter here)::

    A_tab = [A_1 ; … ; A_n ; 0]  (n+1, R, d_in)        B_tab = [c_1 s_1 B_1ᵀ ; … ; 0]  (n+1, R, d_out)

and the LoRA term of every row is, on CUDA with Triton, the SGMV kernels over the router's sorted segments
with their own backward (:func:`peftlab.kernels.sgmv_backward.sgmv_lora`: shrink/expand forward, per-adapter
weight-gradient reductions and a shrink/expand dX); elsewhere (CPU, or ``use_kernel="torch"``, or after a
kernel failure) two batched GEMMs, either over the router's padded segments (``(n, L·T, d_in)`` blocks, rows
scattered back with ``index_add``) or over per-row gathered tables (``A_tab[a(m)]``), whichever moves fewer
numbers (:meth:`Router.use_segments`), with autograd's backward. Both compute the SGMV backward: with
G = dY rows of segment a (sorted), t_a = X_a A_aᵀ,

    dB_a = c_a s_a · G_aᵀ t_a        dA_a = (c_a s_a · G_a B_a)ᵀ X_a        dX_a += (c_a s_a · G_a B_a) A_a

so adapter a's gradient comes only from its own rows (padding rows and other adapters' rows meet zero
or other table entries), and every row's dX adds into the shared input gradient with the base term.
There is no Python loop over adapters in the products; only the (n)-sized table stacking and the per-job
dropout draws loop.

**Other slots** (DoRA, bottleneck adapters, ``modules_to_save`` head copies) run per segment of rows, through
the slot's own training forward (``fused_forward`` where it has one, as when it runs alone), so the random
draws are those of a separate run.

**Per-job random streams.** :func:`peftlab.serving.hooks.set_row_streams` gives each adapter its own CPU
generator; every random draw an adapter makes for its rows (dropout seeds and masks) runs under
:func:`job_rng`, which swaps that generator in for the global one. A job trained in a pack therefore draws
exactly the masks it draws alone from the same seed; where a pack right-pads a job's rows to a longer
sequence (``lengths`` of :func:`peftlab.serving.hooks.set_row_streams`), its draws cover its own length
only. Dropout inside the base model itself (``nn.Dropout`` and the attention dropout) draws per job segment
from the same streams while :func:`peftlab.serving.base_rows.base_dropout_rows` is active (``train_many``'s
``base_dropout=True``); otherwise it draws over the whole batch from the global generator.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def job_rng(router, name: str, layer=None):
    """Run the block on adapter ``name``'s own random stream (the global CPU generator swapped for it).

    Gradient checkpointing recomputes a layer's forward during backward; the recompute must draw what the
    forward drew. So the stream's state before each (layer, adapter) block is kept on the router, and a
    block run inside backward replays from it (on a copy) without advancing the stream.
    """
    gen = (getattr(router, "streams", None) or {}).get(name)
    if gen is None:
        yield
        return
    marks = router.__dict__.setdefault("stream_marks", {})
    key = (id(layer), name)
    if torch._C._current_graph_task_id() != -1 and key in marks:  # a recompute inside backward: replay
        replay = torch.Generator()
        replay.set_state(marks[key])
        with on_stream(replay):
            yield
        return
    marks[key] = gen.get_state()
    with on_stream(gen):
        yield


@contextlib.contextmanager
def on_stream(gen: torch.Generator | None):
    """Run the block with the CPU generator ``gen`` in place of the global one (its state advances with the
    draws; the global generator is left as it was). None: the global generator, unchanged."""
    if gen is None:
        yield
        return
    saved = torch.get_rng_state()
    torch.set_rng_state(gen.get_state())
    try:
        yield
    finally:
        gen.set_state(torch.get_rng_state())
        torch.set_rng_state(saved)


def _own_length(router, j: int, x: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Job j's rows cut to its own sequence length when a pack right-padded them (``router.lengths``), so its
    random draws have the shapes they have alone."""
    own = (getattr(router, "lengths", None) or {}).get(router.adapters[j])
    if own is not None and xs.dim() == 3 and own < xs.shape[1]:
        return xs[:, :own]
    return xs


def _tables(entries, n: int, dtype, device):
    """Differentiable (A_tab (n+1, R, d_in), B_tab (n+1, R, d_out)) for ``entries`` [(j, slot, c)]; zero elsewhere;
    and the ranks [r_j] (n+1,) (0 where job j has no slot here)."""
    factors = {j: (slot.low_rank_factors(), c) for j, slot, c in entries}
    r_max = max(f[0].shape[0] for f, _ in factors.values())
    a0, b0, _ = next(iter(factors.values()))[0]
    d_in, d_out = a0.shape[1], b0.shape[0]
    zero_a = a0.new_zeros(r_max, d_in, dtype=dtype, device=device)
    zero_b = b0.new_zeros(r_max, d_out, dtype=dtype, device=device)
    a_rows, b_rows = [], []
    for j in range(n + 1):
        hit = factors.get(j)
        if hit is None:
            a_rows.append(zero_a)
            b_rows.append(zero_b)
            continue
        (a, b, s), c = hit
        pad = r_max - a.shape[0]
        a_rows.append(F.pad(a.to(device, dtype), (0, 0, 0, pad)))
        b_rows.append(F.pad((b.to(device, dtype).t() * (s * c)), (0, 0, 0, pad)))
    ranks = [factors[j][0][0].shape[0] if j in factors else 0 for j in range(n + 1)]
    return torch.stack(a_rows), torch.stack(b_rows), ranks


#: Set after the Triton path failed once in this process: training stays on the torch path.
_KERNELS_FAILED: list[str] = []


def _sgmv_train(router, xin: torch.Tensor, result: torch.Tensor, a_tab, b_tab, ranks: list[int], tokens: int):
    """result + every row's LoRA term through the SGMV kernels and their backward (CUDA), or None when they fail
    (a one-time warning; the torch path runs from then on)."""
    from ..kernels import sgmv_backward

    B, d_in, d_out = xin.shape[0], xin.shape[-1], result.shape[-1]
    dev = xin.device
    try:
        perm, start, length, max_len = router.segments(tokens, dev)
        local = router.cached(("train_local", tuple(ranks), str(dev)), lambda: (
            torch.tensor([j if r > 0 else -1 for j, r in enumerate(ranks[:-1])], dtype=torch.int32, device=dev),
            torch.tensor(ranks, dtype=torch.int32, device=dev)))
        y = sgmv_backward.sgmv_lora(xin.reshape(B * tokens, d_in), a_tab, b_tab, result.reshape(B * tokens, d_out),
                                    start, length, local[0], max_len, perm, local[1])
    except Exception as exc:  # noqa: BLE001 - a compile/launch failure: the torch path still trains, once loudly
        _KERNELS_FAILED.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"mixed-batch training: the Triton SGMV kernels failed ({type(exc).__name__}: {exc}); "
                      f"using torch from now on", stacklevel=3)
        return None
    return y.reshape(result.shape)


def add_lora_train(layer, router, x: torch.Tensor, result: torch.Tensor, present, kernels: bool = False) -> torch.Tensor:
    """result (B, …, d_out) + every row's LoRA-like term, differentiable (see the module docstring).

    ``present``: [(j, slot)] of the router's adapters j that run a LoRA-like slot on this layer; ``kernels``:
    use the Triton SGMV kernels (the router decides: CUDA tensors, Triton importable, no slot asking for torch).
    """
    B, d_in, d_out = x.shape[0], x.shape[-1], result.shape[-1]
    tokens = x.numel() // (B * d_in) if B else 0
    dtype = present[0][1].low_rank_factors()[0].dtype
    xin = x.to(dtype).reshape(B, tokens, d_in)
    entries, changed_rows, changed = [], [], []
    for j, slot in present:  # each job's dropout, on its own stream (x' has the dropped rows)
        rows = router.rows_of(j, x.device)
        full = xin.index_select(0, rows)
        xs = _own_length(router, j, x, full)
        with job_rng(router, router.adapters[j], layer):
            dropped, c = slot.dropout_input(xs)
        if dropped is not xs:
            dropped = dropped.to(dtype)
            if dropped.shape[1] < tokens:  # the padding past the job's own length stays undropped
                dropped = torch.cat([dropped, full[:, dropped.shape[1]:]], dim=1)
            changed_rows.append(rows)
            changed.append(dropped)
        entries.append((j, slot, c))
    if changed:  # one scatter for every job's dropped rows (a copy per job would keep n copies of x for backward)
        xin = xin.index_copy(0, torch.cat(changed_rows), torch.cat(changed))
    n = len(router.adapters)
    a_tab, b_tab, ranks = _tables(entries, n, dtype, x.device)
    if kernels and not _KERNELS_FAILED:
        out = _sgmv_train(router, xin, result, a_tab, b_tab, ranks, tokens)
        if out is not None:
            return out
    if router.use_segments(tokens):
        pad, keep, rows = router.padded(x.device)
        L = router.max_count
        xp = xin.index_select(0, pad).view(n, L * tokens, d_in)
        delta = torch.bmm(torch.bmm(xp, a_tab[:n].transpose(1, 2)), b_tab[:n])  # (n, L·T, d_out)
        delta = delta.view(n * L, tokens, d_out).index_select(0, keep)
        out = result.reshape(B, tokens, d_out).index_add(0, rows, delta.to(result.dtype))
    else:
        per_row = router.row_index(x.device)
        per_row = torch.where(per_row < 0, n, per_row)  # base rows: the zero entry
        a_rows, b_rows = a_tab.index_select(0, per_row), b_tab.index_select(0, per_row)
        delta = torch.bmm(torch.bmm(xin, a_rows.transpose(1, 2)), b_rows)
        out = result.reshape(B, tokens, d_out) + delta.to(result.dtype)
    return out.reshape(result.shape)


def segment_train(layer, router, x: torch.Tensor, result: torch.Tensor | None, others, *args: Any, **kwargs: Any):
    """Run the non-LoRA-like slots ``others`` [(j, slot)] on their rows, each as it trains alone (its fused
    forward where it has one), under its job's stream; result rows of their segments are replaced."""
    for j, slot in others:
        rows = router.rows_of(j, x.device)
        captured = getattr(slot, "captured", None)
        if captured is not None:  # parallel bottleneck: the sublayer input its pre-hook captured
            slot.captured = captured.index_select(0, rows)
        xs = _own_length(router, j, x, x.index_select(0, rows))
        own = xs.shape[1] if xs.dim() == 3 and xs.shape[1] < x.shape[1] else None
        if own is not None and getattr(slot, "captured", None) is not None:
            slot.captured = slot.captured[:, :own]
        with job_rng(router, router.adapters[j], layer):
            part = slot.fused_forward(xs, 1.0) if not args and not kwargs else None
            if part is None and slot.replaces_base:
                part = slot.contribute(xs, None, 1.0, *args, **kwargs)
            elif part is None:
                base_rows = result.index_select(0, rows)
                part = slot.contribute(xs, base_rows[:, :own] if own is not None else base_rows, 1.0)
        if own is not None:  # the padding past the job's own length keeps the base output
            part = torch.cat([part.to(result.dtype), result.index_select(0, rows)[:, own:]], dim=1)
        result = result.index_copy(0, rows, part.to(result.dtype))
    return result
