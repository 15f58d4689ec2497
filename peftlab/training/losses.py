r"""Fused, chunked linear + cross-entropy for causal-LM heads (the idea of Liger's fused linear CE).

For hidden states h (N, H), head weight W (V, H) and labels y (N,) (``-100`` ignored)::

    loss = (1 / n) Σ_{i: y_i ≠ -100} [ logsumexp(W h_i + b) - (W h_i + b)_{y_i} ]

computed over row chunks of at most ~2²⁵ logits, so the full (N, V) fp32 logits tensor is never
materialised. The gradients are computed chunk by chunk in the forward pass and kept
(dL/dh: (N, H); dL/dW, dL/db only if the head trains), so backward is a scale by the incoming
gradient. :func:`causal_lm_loss` runs a wrapped causal LM through its own ``forward`` (so every
adapter hook still applies) with the head swapped for an identity, then applies this loss to the
shifted labels, as transformers' causal-LM loss does.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels``; shapes in the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_rows: int):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 (fp64 stays fp64)
        n_valid = int((labels != IGNORE_INDEX).sum())
        denom = max(n_valid, 1)
        grad_h = torch.zeros_like(hidden)
        need_w = weight.requires_grad
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = (
            torch.zeros(weight.shape[0], dtype=acc, device=weight.device)
            if bias is not None and bias.requires_grad
            else None
        )
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            y = labels[start : start + chunk_rows]
            logits = (h @ weight.t()).to(acc)
            if bias is not None:
                logits += bias.to(acc)
            valid = y != IGNORE_INDEX
            safe_y = torch.where(valid, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, safe_y[:, None]).squeeze(1)) * valid).sum()
            # d loss / d logits = (softmax - onehot) / n on valid rows; reuse the logits buffer
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(y), device=y.device), safe_y] -= 1.0
            grad.mul_(valid[:, None] / denom)
            grad_h[start : start + chunk_rows] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += grad.t() @ h.to(acc)
            if grad_b is not None:
                grad_b += grad.sum(0)
        ctx.save_for_backward(
            grad_h, grad_w if need_w else torch.empty(0), grad_b if grad_b is not None else torch.empty(0)
        )
        ctx.need_w, ctx.need_b = need_w, grad_b is not None
        ctx.weight_dtype = weight.dtype
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if ctx.need_w else None
        db = (grad_b * grad_out).to(ctx.weight_dtype) if ctx.need_b else None
        return grad_h * grad_out.to(grad_h.dtype), dw, db, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean CE of the head ``(weight, bias)`` over ``hidden`` (..., H) and ``labels`` (...); -100 ignored."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    if chunk_rows is None:
        chunk_rows = max(1, 2**25 // weight.shape[0])
    return FusedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_rows)


class _Identity(nn.Module):
    def forward(self, x):
        return x


def causal_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token loss of a (wrapped) causal LM without materialising the logits.

    ``batch``: input_ids, attention_mask (optional), labels (``-100`` ignored), as for ``model(**batch)``.
    """
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, nn.Linear):
        return model(**batch).loss
    parent, name = model, None
    for path, module in model.named_modules():
        if module is head:
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            break
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    setattr(parent, name, _Identity())
    try:
        hidden = model(**inputs).logits  # the final hidden states: the head is an identity here
    finally:
        setattr(parent, name, head)
    labels = batch["labels"]
    return fused_linear_cross_entropy(hidden[:, :-1], head.weight, labels[:, 1:], head.bias)
