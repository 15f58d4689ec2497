r"""DoRA: weight-decomposed LoRA (Liu et al., 2024, arXiv:2402.09353), as a LoRA slot variant.

The adapted weight is a direction (the LoRA-updated weight, row-normalised) times a trained
magnitude ``m`` (one entry per output unit)::

    W' = m ⊙ (W + s·B A) / n,        n_i = ‖(W + s·B A)_i‖   (row i of the (d_out, d_in) weight)
    y  = W' x + b = (m / n) ⊙ (x Wᵀ + s·(D(x) Aᵀ) Bᵀ) + b

with ``n`` treated as a constant in backward (paper §4.3), ``m`` initialised to ``‖W‖`` so that a
fresh adapter computes exactly the base model. Dropout D acts on the LoRA input only, as in plain
LoRA (HF PEFT additionally applies the dropped input to the base term; with p = 0, and at
inference, the two are the same function).

**Without its cost.** HF PEFT builds the full (d_out, d_in) ``B A`` (through an identity matrix)
and ``W + s·B A`` in every forward. Here ``W + s·B A`` is never formed:

    n² = ‖W‖²_row + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B G) ⊙ B),     G = A Aᵀ  (r, r)

* ``‖W‖²_row`` (d_out) is cached per frozen base weight (keyed by its storage and version, so a
  merge into the base or a ``.to()`` recomputes it);
* the cross term is one thin product ``W Aᵀ`` (d_out, r): r·d_in·d_out FLOPs, r/M of the forward;
* the whole ``n`` is cached while A, B and W are unchanged (gradient-accumulation micro-steps,
  evaluation), so inference pays nothing beyond LoRA.

Forward is LoRA's own fused path (:func:`peftlab.backends.lora_ops.lora_forward`: the lean autograd
function, or the Triton kernel on CUDA, or the quantized-base path) followed by a thin elementwise
:class:`DoraScaleFunction`. What is saved for backward beyond LoRA: the LoRA output h (the scale's own
input, which nothing outside the layer sees, so the caller may modify the layer output y in place) and three
d_out vectors. Its backward, with g = dL/dy and h = x Wᵀ + s·D(x)AᵀBᵀ + b:

    dL/dh = g ⊙ (m/n)   (into LoRA's backward: dX, dA, dB as for LoRA)
    dL/dm = Σ_M g ⊙ (h − b) / n          db = Σ_M g ⊙ (1 − m/n)

Merging: ``merged(W, w) = W + w·(W' − W)``; unmerging needs the ``n`` of the merge (the merged
rows have norm |m| whatever n was), which the slot keeps from its last merge.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...backends.dora_ops import fused_row_norm
from ...backends.lora_ops import lora_delta, lora_forward
from ...core.layer import get_base_weight
from ...util.errors import MergeError
from .slot import LoraSlot, adapter_dtype


class DoraScaleFunction(torch.autograd.Function):
    """y = (m/n) ⊙ (y_lora − b) + b for y_lora = x Wᵀ + b + s·LoRA(x) of shape (..., d_out) (DoRA, Liu et al. 2024,
    eq. 5: W' = m · (W + ΔW) / ‖W + ΔW‖_c with the norm n a constant).

    m (d_out) trains, n (d_out) is a constant, b (d_out) or None. Saves y_lora (this function's input, private
    to the layer), m/n and b, never its own output: the caller may modify y in place (Wav2Vec2's SpecAugment,
    Longformer's ``query /= √d``), and y is a fresh tensor, never a view.

    Backward: dL/dy_lora = g ⊙ (m/n); dL/dm = Σ_rows g ⊙ (y_lora − b) / n; dL/db = Σ_rows g ⊙ (1 − m/n).
    """

    @staticmethod
    def forward(ctx, y_lora, magnitude, norm, bias):
        scale = magnitude.detach().float() / norm  # (d_out,) fp32
        s = scale.to(y_lora.dtype)
        if bias is not None:
            b = bias.detach().to(y_lora.dtype)
            y = torch.addcmul(b, y_lora - b, s)
        else:
            y = y_lora * s
        ctx.save_for_backward(y_lora, norm, scale, bias)
        ctx.magnitude_dtype = magnitude.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        y_lora, norm, scale, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_out = g.shape[-1]
        g2 = g.reshape(-1, d_out)
        grad_y = grad_m = grad_b = None
        buffer = None  # the one full-size temporary: g ⊙ y_lora, then reused for dL/dy_lora
        g_sum = g2.sum(0, dtype=torch.float32) if bias is not None and (need[1] or need[3]) else None
        if need[1]:
            y2 = y_lora.reshape(-1, d_out)
            if g2.dtype == torch.float32 and y2.dtype == torch.float32:
                buffer = torch.mul(g2, y2)
                gy = buffer.sum(0)
            else:  # low precision: fp32 products in row chunks (no full fp32 copy)
                gy = torch.zeros(d_out, dtype=torch.float32, device=g.device)
                step = max(1, (1 << 22) // max(1, d_out))
                for i in range(0, g2.shape[0], step):
                    gy += (g2[i : i + step].float() * y2[i : i + step].float()).sum(0)
            if g_sum is not None:  # Σ g ⊙ (y_lora − b) = Σ g ⊙ y_lora − b ⊙ Σ g: no (y_lora − b) copy
                gy = gy - bias.detach().float() * g_sum
            grad_m = (gy / norm.float()).to(ctx.magnitude_dtype)
        if need[0]:
            s = scale.to(g.dtype)
            grad_y = (torch.mul(g2, s, out=buffer) if buffer is not None else g2 * s).view(g.shape)
        if bias is not None and need[3]:
            grad_b = (g_sum * (1.0 - scale)).to(bias.dtype)
        return grad_y, grad_m, None, grad_b


def dora_saved_bytes(m: int, d_out: int, y_bytes: int) -> dict[str, int]:
    """What :class:`DoraScaleFunction` saves for backward beyond LoRA's own function (the estimator's DoRA rule).

    y_lora: (M, d_out) in the activation dtype (``y_bytes``), the LoRA output dL/dm needs; the norm n and the
    scale m/n: two (d_out,) fp32 vectors. The bias, when there is one, is a parameter (not counted).
    """
    return {"y_lora": m * d_out * y_bytes, "norm_scale": 2 * d_out * 4}


def _weight_key(base: nn.Module) -> tuple | None:
    """Identity of the base weight's current values (storage, version, dtype, device); None if untrackable."""
    weight = getattr(base, "weight", None)
    if weight is None:
        return None
    try:
        return (id(weight), weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))
    except RuntimeError:  # inference tensors have no version counter
        return None


def _tensor_key(t: torch.Tensor) -> tuple | None:
    try:
        return (t.data_ptr(), t._version, t.device)
    except RuntimeError:
        return None


def dense_base_weight(base: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) weight of a frozen base (a view for float layers, dequantized for bitsandbytes)."""
    return get_base_weight(base)


@torch.no_grad()
def row_norm_sq(weight: torch.Tensor) -> torch.Tensor:
    """‖W_i‖² for every row i of a (d_out, d_in) weight, in fp32 (chunked: no full fp32 copy of W)."""
    out = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    step = max(1, (1 << 24) // max(1, weight.shape[1]))
    for i in range(0, weight.shape[0], step):
        out[i : i + step] = weight[i : i + step].float().pow(2).sum(1)
    return out


@torch.no_grad()
def lora_row_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    weight_norm_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """n = ‖W + s·B A‖_row (d_out,) in fp32, without forming W + s·B A (thin products, module docstring).

    weight: (d_out, d_in); lora_A: (r, d_in); lora_B: (d_out, r).
    """
    a = lora_A.detach().float()
    b = lora_B.detach().float()
    wn = row_norm_sq(weight) if weight_norm_sq is None else weight_norm_sq
    if a.shape[0] == 0:
        return wn.clamp_min(0).sqrt()
    if weight.dtype == torch.float32:
        cross = weight @ a.t()  # W Aᵀ (d_out, r)
    else:
        cross = (weight @ a.t().to(weight.dtype)).float()
    gram = a @ a.t()  # (r, r)
    # n² = ‖W‖² + rowsum(B ⊙ (2s·W Aᵀ + s²·B G))
    inner = torch.addmm(cross, b, gram, beta=2.0 * scaling, alpha=scaling * scaling)
    return (wn + (b * inner).sum(1)).clamp_min_(0).sqrt_()


class DoraMerge:
    """DoRA's exact merge and unmerge in fp64, for any weight whose first axis is the output channel (a linear's
    (d_out, d_in), a convolution's (C_out, C_in/groups, *kernel)): with ΔW = s·B A (:meth:`scaled_product64`) and
    n = ‖W + ΔW‖ per output channel, W' = W + w·(m ⊙ (W + ΔW)/n − W). The slot keeps n from its merge for the
    unmerge."""

    def scaled_product64(self, device: torch.device) -> torch.Tensor:
        """s·B A in fp64, shaped as the base weight."""
        return (self.lora_B.double() @ self.lora_A.double()).to(device) * self.scaling

    def _merge(self, weight_matrix: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        w64 = weight_matrix.double()
        direction = w64 + self.scaled_product64(w64.device)
        norm = torch.linalg.vector_norm(direction.flatten(1), dim=1)
        factor = self._per_channel(self.magnitude.detach().double().to(w64.device).flatten() / norm, w64)
        return (w64 + weight * (factor * direction - w64)).to(weight_matrix.dtype), norm

    @staticmethod
    def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.view((-1,) + (1,) * (like.dim() - 1))

    def merged(self, weight_matrix: torch.Tensor, weight: float) -> torch.Tensor:
        """W + w·(m ⊙ (W + s·B A)/n − W), n = ‖W + s·B A‖ per output channel (computed in fp64)."""
        out, self._merge_norm = self._merge(weight_matrix, weight)
        return out

    def unmerged(self, weight_matrix: torch.Tensor, weight: float) -> torch.Tensor:
        """Inverse of :meth:`merged` with the n of that merge: W = (W' − w·c⊙sBA)/(1 − w + w·c), c = m/n."""
        if self._merge_norm is None:
            raise MergeError(
                f"DoRA adapter {self.name!r}: unmerging needs the weight norm of its merge, which this slot does not "
                f"have (was it merged by another process?); reload the base model instead"
            )
        w64 = weight_matrix.double()
        lora = self.scaled_product64(w64.device)
        magnitude = self.magnitude.detach().double().to(w64.device).flatten()
        c = self._per_channel(magnitude / self._merge_norm.to(w64.device), w64)
        restored = (w64 - weight * c * lora) / (1.0 - weight + weight * c)
        self._merge_norm = None
        return restored.to(weight_matrix.dtype)


class DoraSlot(DoraMerge, LoraSlot):
    """A DoRA adapter: a :class:`LoraSlot` plus a trained magnitude ``lora_magnitude`` (d_out,).

    Same constructor as :class:`LoraSlot`. The forward is LoRA's fused path followed by
    :class:`DoraScaleFunction`; see the module docstring for the equations and the costs.
    """

    roles = ("lora_A", "lora_B", "lora_magnitude")
    method = "lora"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wnorm: tuple[Any, torch.Tensor] | None = None  # (weight key, ‖W‖²_row)
        self._norm: tuple[Any, torch.Tensor] | None = None  # (weight, A, B, s key, n)
        self._merge_norm: torch.Tensor | None = None  # n at the last merge (for unmerge)

    @staticmethod
    @torch.no_grad()
    def make_magnitude(base_layer: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> nn.Parameter:
        """m = ‖W + s·B A‖_row (d_out,): the output at init equals the LoRA output (the base when B = 0)."""
        weight = dense_base_weight(base_layer)
        if weight.device.type == "meta":
            return nn.Parameter(torch.empty(weight.shape[0], device="meta", dtype=adapter_dtype(base_layer)))
        norm = lora_row_norm(weight, lora_A.to(weight.device), lora_B.to(weight.device), scaling)
        return nn.Parameter(norm.to(adapter_dtype(base_layer)))

    @property
    def magnitude(self) -> nn.Parameter:
        return self.layer.lora_magnitude[self.name]

    # -- the norm --------------------------------------------------------------------------------
    @torch.no_grad()
    def weight_norm(self, scaling: float | None = None) -> torch.Tensor:
        """n = ‖W + s·B A‖_row (d_out,) fp32 for the current W, A, B (cached while they are unchanged)."""
        s = self.scaling if scaling is None else scaling
        base = self.base_layer
        wkey = _weight_key(base)
        key = None
        if wkey is not None:
            ka, kb = _tensor_key(self.lora_A), _tensor_key(self.lora_B)
            if ka is not None and kb is not None:
                key = (wkey, ka, kb, s)
        if key is not None and self._norm is not None and self._norm[0] == key:
            return self._norm[1]
        weight = dense_base_weight(base)
        fused = fused_row_norm(weight, self.lora_A, self.lora_B, s, self.use_kernel)  # CUDA: one pass over W
        if fused is not None:
            norm, wn = fused
            self._wnorm = (wkey, wn) if wkey is not None else None
        else:
            if self._wnorm is None or wkey is None or self._wnorm[0] != wkey:
                wn = row_norm_sq(weight)
                self._wnorm = (wkey, wn) if wkey is not None else None
            else:
                wn = self._wnorm[1]
            norm = lora_row_norm(weight, self.lora_A, self.lora_B, s, wn)
        if key is not None:
            self._norm = (key, norm)
        return norm

    # -- the variant protocol --------------------------------------------------------------------
    def fused_forward(self, x: torch.Tensor, weight: float) -> torch.Tensor | None:
        if weight != 1.0:
            return None

        y_lora = lora_forward(self, x)
        bias = getattr(self.base_layer, "bias", None)
        return DoraScaleFunction.apply(y_lora, self.magnitude, self.weight_norm(), bias)

    def contribute(self, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        """result + w·(W' x − W x): the base term is recomputed here (several slots run at once)."""
        base = self.base_layer
        dense = dense_base_weight(base)
        base_out = torch.nn.functional.linear(x.to(dense.dtype), dense.detach()).to(self.lora_A.dtype)
        scale = self.magnitude / self.weight_norm()
        out = (scale - 1.0) * base_out + scale * lora_delta(self, x, self.scaling)
        return (result + weight * out).to(result.dtype)

    def low_rank_factors(self) -> None:
        """None: DoRA rescales the whole output row by row, so it is not a low-rank product."""
        return None

    def delta_weight(self) -> torch.Tensor:
        """W' − W for the current base W, (d_out, d_in) fp32."""
        weight = dense_base_weight(self.base_layer).float()
        return self._merge(weight, 1.0)[0] - weight

    def describe(self) -> str:
        return super().describe() + ", dora"
