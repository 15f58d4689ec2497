r"""The base model's own dropout, per job, in a packed training pass: :func:`base_dropout_rows`.

A pack stacks the rows of several jobs into one batch. The base model's dropout (its ``nn.Dropout`` modules
and the attention-probability dropout its attention function applies) would draw one mask over the whole
batch from the global generator; a job run alone draws, in the same module order, masks over its own rows
only, from the global generator seeded as that job was. So while a pack runs, every base dropout runs once
per job segment of rows, under that job's stream (:func:`peftlab.serving.train_rows.on_stream`), on the
job's rows cut to its own sequence length (the pack right-pads):

    y[rows_j, :w_j] = dropout_j(x[rows_j, :w_j])         (drawn from stream j, as alone)

Attention: the attention function (``ALL_ATTENTION_FUNCTIONS[impl]``, or the model module's
``eager_attention_forward``) is called per segment with query/key/value (B, H, T, D) cut to
(b_j, H, w_j, D) and the mask to its rows and (w_j, w_j); the padding positions' outputs are zero (they are
masked out as keys, and no job reads them). Dropout modules inside adapter layers (the adapters' own, head
copies) are left alone: :mod:`peftlab.serving.train_rows` runs those per job already.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn

from ..core.state import adapter_layers
from .train_rows import on_stream


def _cut(x: torch.Tensor, width: int | None, dim: int) -> torch.Tensor:
    return x.narrow(dim, 0, width) if width is not None and x.dim() > dim and x.shape[dim] > width else x


def _segments(x: torch.Tensor, segments, fn, seq_dim: int = 1) -> torch.Tensor:
    """fn(rows of job j, cut to its width) under stream j, for every job; scattered back (uncut tail kept)."""
    parts, rows_all = [], []
    for rows, gen, width in segments:
        xs = x.index_select(0, rows.to(x.device))
        own = _cut(xs, width, seq_dim) if x.dim() >= 3 else xs
        with on_stream(gen):
            y = fn(own)
        if y.shape != xs.shape:  # the padding past the job's own length stays as it was
            y = torch.cat([y, xs.narrow(seq_dim, y.shape[seq_dim], xs.shape[seq_dim] - y.shape[seq_dim])], dim=seq_dim)
        parts.append(y)
        rows_all.append(rows.to(x.device))
    return x.index_copy(0, torch.cat(rows_all), torch.cat(parts))


def _dropout_forward(module: nn.Dropout, segments):
    original = type(module).forward

    def forward(x):
        if not module.training or module.p == 0:
            return original(module, x)
        return _segments(x, segments, lambda xs: original(module, xs))

    return forward


def _attention(original, segments):
    def attention(module, query, key, value, attention_mask, *args, dropout: float = 0.0, **kwargs):
        if not dropout:
            return original(module, query, key, value, attention_mask, *args, dropout=dropout, **kwargs)
        B, T = query.shape[0], query.shape[2]
        out = None
        for rows, gen, width in segments:
            w = width or T
            rows = rows.to(query.device)
            q, k, v = (t.index_select(0, rows)[:, :, :w] for t in (query, key, value))
            mask = attention_mask
            if mask is not None:
                mask = mask.index_select(0, rows) if mask.shape[0] == B else mask
                mask = mask[..., :w, :] if mask.shape[-2] == T else mask
                mask = mask[..., :w] if mask.shape[-1] == T else mask
            with on_stream(gen):
                y, _ = original(module, q, k, v, mask, *args, dropout=dropout, **kwargs)  # (b, w, H, D)
            if out is None:
                out = y.new_zeros((B, T, *y.shape[2:]))
            if w < T:
                y = torch.cat([y, y.new_zeros((y.shape[0], T - w, *y.shape[2:]))], dim=1)
            out = out.index_copy(0, rows, y)
        return out, None

    return attention


@contextlib.contextmanager
def base_dropout_rows(
    model: nn.Module, segments: list[tuple[torch.Tensor, torch.Generator, int | None]]
) -> Iterator[None]:
    """While the block runs, the base model's dropout draws per job segment (module docstring).

    ``segments``: per job, (its row indices in the batch, its CPU generator, its own sequence length or None).
    Every row of the batch must belong to one segment. Restores the modules and the attention table after.
    """
    from transformers.modeling_utils import AttentionInterface

    inside = {id(m) for _, layer in adapter_layers(model) for m in layer.modules()}
    swapped = [m for m in model.modules() if isinstance(m, nn.Dropout) and id(m) not in inside]
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    table = AttentionInterface._global_mapping
    saved_attention = table.get(impl, None) if impl else None
    try:
        for m in swapped:
            m.forward = _dropout_forward(m, segments)
        if impl in table:
            table[impl] = _attention(saved_attention, segments)
        elif impl == "eager":
            eager = {sys.modules[type(m).__module__].__dict__.get("eager_attention_forward") for m in model.modules()}
            eager.discard(None)
            if len(eager) == 1:
                table["eager"] = _attention(eager.pop(), segments)
        yield
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)
        if impl in table:
            if saved_attention is None:
                del table[impl]
            else:
                table[impl] = saved_attention


__all__ = ["base_dropout_rows"]
