r"""LoRA initialisations: ``LoraConfig(init=...)``, each matching HF PEFT's ``init_lora_weights`` of that name.

For a base weight W (d_out, d_in), rank r and scale s, the adapter starts at A (r, d_in), B (d_out, r):

* ``"default"``: A Kaiming-uniform(a=√5), B = 0 (Hu et al.).
* ``"gaussian"``: A ~ N(0, 1/r²) (std 1/r, as HF PEFT), B = 0.
* ``"pissa"`` / ``"pissa_niter_N"`` (Meng et al., 2024, arXiv:2404.02948): W = V S Uᵀ (SVD; with
  ``niter`` the randomised ``torch.svd_lowrank`` with N subspace iterations), S_r' = S_r / s,
  ``A = diag(√S_r') U_rᵀ``, ``B = V_r diag(√S_r')``: the adapter starts on the principal components.
* ``"olora"`` (Büyükakyüz, 2024, arXiv:2406.01775): W = Q R (QR), ``A = R[:r]``, ``B = Q[:, :r]``.
* ``"loftq"`` / ``"loftq_iter_N"`` (Li et al., 2023, arXiv:2310.08659): for N iterations (default 1)
  ``Q_t = quant(W − s·B_{t−1}A_{t−1})``, ``s·B_t A_t = SVD_r(W − Q_t)`` (B_0 A_0 = 0), so that
  ``Q + s·B A ≈ W`` better than Q alone. The base then holds Q.

**PiSSA and OLoRA leave the base untouched.** HF PEFT subtracts ``s·B₀A₀`` from the base weight (the
"residual model"), which changes what ``disable_adapters``, ``unwrap`` and every other adapter on the
module see. Here the slot (:class:`ResidualLoraSlot`) keeps the initial ``A₀, B₀`` as frozen buffers
and computes ``W x + s·(B A − B₀ A₀) x`` as one rank-2r LoRA product: the same function and the same
gradients as PiSSA on a residual base, with the base weights left as they were. It is exactly the
form HF PEFT converts such adapters to for sharing (``path_initial_model_for_weight_conversion``): a
plain LoRA of rank 2r, ``A' = [A; A₀]``, ``B' = [B, −B₀]``, alpha doubled (√2× with rsLoRA), which
:func:`peftlab.export_peft` writes.

**LoftQ needs W in full precision.** On a float base it quantizes W itself (NF4, blocks of 64, no
double quantization: HF PEFT's settings) and writes ``dequant(Q)`` back into the float weight, as HF
PEFT does. On a bitsandbytes base (``peftlab.load_quantized`` / ``peftlab.quantize``) the float W is
read from the model's safetensors checkpoint (``model.config._name_or_path``) and Q is made by the
layer's own quantizer (its block size, NF4/FP4, double quantization), so Q is exactly what the layer
computes with. Unlike HF PEFT (``A = R, B = L`` whatever the scale), B and A are divided by √s, so
``Q + s·B A ≈ W`` for every alpha (the two agree when alpha = r).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ...backends.quant.bnb import require_bnb
from ...util.errors import ConfigError

_INIT_RE = re.compile(r"(default|gaussian|olora|pissa|loftq)(?:_(niter|iter)_(\d+))?")
VALID_INITS = ("default", "gaussian", "pissa", "pissa_niter_N", "olora", "loftq", "loftq_iter_N")


def parse_init(init: Any) -> tuple[str, int | None]:
    """``"pissa_niter_4"`` -> ("pissa", 4); ``"loftq"`` -> ("loftq", 1); ConfigError naming the valid values."""
    match = _INIT_RE.fullmatch(init) if isinstance(init, str) else None
    ok = match is not None
    if ok:
        kind, tag, num = match.groups()
        ok = (tag is None) or (kind == "pissa" and tag == "niter") or (kind == "loftq" and tag == "iter")
        ok = ok and (num is None or int(num) >= (0 if kind == "pissa" else 1))
    if not ok:
        raise ConfigError(
            f"LoRA init must be one of {', '.join(VALID_INITS)} (N an integer: pissa_niter_N ≥ 0, loftq_iter_N ≥ 1), "
            f"got {init!r}"
        )
    if kind == "loftq":
        return kind, int(num) if num is not None else 1
    return kind, int(num) if num is not None else None


# ---- the residual slot (PiSSA, OLoRA) -------------------------------------------------------------


# ---- the initialisations -----------------------------------------------------------------------------


class _small_cpu_linalg:
    """Run a CPU factorisation of a small matrix on one thread (the OpenMP pool costs more than it gains there:
    an SVD of a 64×32 matrix takes ~0.3 s on two busy threads, 0.2 ms on one)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.active = matrix.device.type == "cpu" and matrix.numel() < (1 << 22)

    def __enter__(self):
        if self.active:
            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.threads)


@torch.no_grad()
def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of PiSSA for W (d_out, d_in) fp32: A = diag(√(S_r/s)) U_rᵀ (r, d_in), B = V_r diag(√(S_r/s)) (d_out, r)."""
    with _small_cpu_linalg(weight):
        if niter is None:
            v, s, uh = torch.linalg.svd(weight, full_matrices=False)
            vr, sr, uhr = v[:, :r], s[:r] / scaling, uh[:r]
        else:
            vr, sr, ur = torch.svd_lowrank(weight, r, niter=niter)
            sr, uhr = sr / scaling, ur.t()
    root = torch.sqrt(sr)
    return root.unsqueeze(1) * uhr, vr * root.unsqueeze(0)


@torch.no_grad()
def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of OLoRA for W (d_out, d_in) fp32: W = Q R, A = R[:r] (r, d_in), B = Q[:, :r] (d_out, r)."""
    with _small_cpu_linalg(weight):
        q, rr = torch.linalg.qr(weight)
    return rr[:r].contiguous(), q[:, :r].contiguous()


@torch.no_grad()
def scaled_svd_factors(residual: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·B A the best rank-r approximation of ``residual`` (SVD, split √S on both sides)."""
    with _small_cpu_linalg(residual):
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return root.unsqueeze(1) * vh[:r], u[:, :r] * root.unsqueeze(0)


def _nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """dequant(quant(W)) in NF4, blocks of 64, no double quantization (HF PEFT's LoftQ quantizer), fp32."""
    bnb = require_bnb()
    packed, state = bnb.functional.quantize_4bit(
        weight.contiguous().float(), blocksize=64, compress_statistics=False, quant_type="nf4"
    )
    return bnb.functional.dequantize_4bit(packed, state).float()


@torch.no_grad()
def loftq(
    weight: torch.Tensor, r: int, scaling: float, iters: int, quantize=_nf4_roundtrip
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ: (dequant(Q), A, B) with Q = quant(W − s·B A) alternated with s·B A = SVD_r(W − dequant(Q)).

    ``quantize(dense) -> dequant(quant(dense))``; weight (d_out, d_in) fp32.
    """
    weight = weight.float()
    res = weight
    for i in range(iters):
        deq = quantize(res)
        a, b = scaled_svd_factors(weight - deq, r, scaling)
        if i + 1 < iters:
            res = weight - scaling * (b @ a)
    return deq, a, b


def reconstruction_error(weight: torch.Tensor, deq: torch.Tensor, a=None, b=None, scaling: float = 1.0) -> float:
    """‖W − (Q + s·B A)‖_F (or ‖W − Q‖_F without A, B)."""
    approx = deq if a is None else deq + scaling * (b @ a)
    return torch.linalg.matrix_norm(weight.float() - approx).item()


# ---- the float source of a quantized base ---------------------------------------------------------------


# ---- applying an init during injection -------------------------------------------------------------------


def check_config(config) -> None:
    """Config-level checks of ``init`` / ``use_dora`` (called from LoraConfig.__post_init__)."""
    kind, _ = parse_init(config.init)
    if config.use_dora and kind in ("pissa", "olora"):
        raise ConfigError(
            f"LoRA init {config.init!r} with use_dora=True is not supported; use init 'default', 'gaussian' or 'loftq' "
            f"with DoRA"
        )


# ---- HF PEFT interop --------------------------------------------------------------------------------------


