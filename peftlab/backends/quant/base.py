r"""The interface every quantized-base backend implements, its registry, and the merge machinery they share.

A backend (bitsandbytes, torchao, FP8 block-scaled checkpoints) answers, for a base layer it owns:

* :meth:`QuantBackend.quantize_linear`: build its layer from a float weight (d_out, d_in) and bias;
* :meth:`QuantBackend.dequantize`: the dense (d_out, d_in) float weight the layer computes with;
* :meth:`QuantBackend.forward` / :meth:`QuantBackend.input_grad`: the frozen forward ``x · Ŵᵀ + b`` and
  the input gradient ``dY · Ŵ``, with no dense weight outliving the call (the LoRA ops in
  :mod:`peftlab.backends.lora_ops` call these, never a library type);
* :meth:`QuantBackend.requantize` (plain) and :meth:`QuantBackend.requantize_accurate` (error-feedback
  rounding on a calibration batch, :func:`gptq_round`, on the grid a backend describes with
  :meth:`QuantBackend.rounding_grid` / :meth:`QuantBackend.rounding_offset` and stores with
  :meth:`QuantBackend.write_levels`): write a dense weight back in the layer's format;
* :meth:`QuantBackend.snapshot` / :meth:`QuantBackend.restore`: the stored weight (packed data and
  quantization state) kept by a merge, so that unmerge restores it bit for bit;
* :meth:`QuantBackend.weight_bytes` (a layer) and :meth:`QuantBackend.bytes_for` (a shape and scheme):
  storage, for :func:`peftlab.memory_report` and the estimator.

Merging into a quantized base (:func:`set_and_measure`): W' = dequant(W_q) + ΔW is requantized and the
change of the layer's output on a fixed Gaussian probe X (16, d_in), ``X (Ŵ' − W')ᵀ``, is recorded as
``layer.peftlab_merge_error``; every lossy merge warns with it unless a model-level report is being made.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import torch
from torch import nn

from ...core.layer import register_weight_handler
from ...core.structure import register_linear_predicate
from ...util.errors import ConfigError, MergeError, PeftlabError

#: Rows of the fixed Gaussian probe batch used to measure a layer's merge rounding error.
PROBE_ROWS = 16
REQUANTIZE_MODES = ("plain", "accurate")


class MissingDependencyError(PeftlabError, ImportError):
    """An optional dependency (bitsandbytes, torchao) is not installed."""


class QuantizationError(PeftlabError, RuntimeError):
    """Quantizing is impossible in the current state (e.g. the model is already quantized)."""


class QuantBackend:
    """One family of quantized base layers. Subclasses override what their format needs."""

    #: Registry name (``peftlab.quantize(model, backend=name)``).
    name: str = ""
    #: The schemes ``quantize(..., scheme=...)`` accepts, first the default.
    schemes: tuple[str, ...] = ()
    #: What to pip install when the library is missing.
    install_hint: str = ""

    # -- ownership and building ----------------------------------------------------------------------
    def available(self) -> bool:
        return True

    def owns(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def scheme(self, module: nn.Module) -> str:
        """The scheme of one of its layers (``"nf4"``, ``"int8"``, ``"int4"``, ``"fp8"`` ...)."""
        raise NotImplementedError

    def check_options(self, scheme: str, opts: dict) -> None:
        if scheme not in self.schemes:
            raise ConfigError(
                f"backend {self.name!r} has schemes {', '.join(self.schemes)}, not {scheme!r}"
            )

    def quantize_linear(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str, opts: dict) -> nn.Module:
        """A frozen layer of this backend holding ``weight`` (d_out, d_in) and ``bias`` (float)."""
        raise NotImplementedError

    # -- reading -------------------------------------------------------------------------------------
    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """Dense (d_out, d_in) float weight the layer computes with."""
        raise NotImplementedError

    def compute_dtype(self, module: nn.Module, x: torch.Tensor) -> torch.dtype:
        return x.dtype

    def forward(self, module: nn.Module, x2: torch.Tensor) -> torch.Tensor:
        """Frozen forward ``x2 · Ŵᵀ + b`` for x2 (M, d_in) in :meth:`compute_dtype`; the dense Ŵ is a temporary."""
        weight = self.dequantize(module).to(x2.dtype)
        bias = None if module.bias is None else module.bias.to(x2.dtype)
        return torch.nn.functional.linear(x2, weight, bias)

    def input_grad(self, module: nn.Module, g: torch.Tensor) -> torch.Tensor:
        """``g · Ŵ`` for g (M, d_out) in the compute dtype; the dense Ŵ is a temporary."""
        return g @ self.dequantize(module).to(g.dtype)

    def fusable(self, module: nn.Module) -> bool:
        """True when LoRA training may run the layer through :meth:`forward` / :meth:`input_grad` (frozen)."""
        weight = getattr(module, "weight", None)
        frozen = weight is not None and not weight.requires_grad
        return frozen and (getattr(module, "bias", None) is None or not module.bias.requires_grad)

    def native_inference(self, module: nn.Module, x: torch.Tensor) -> bool:
        """True when the layer's own forward runs on x's device (else inference goes through :meth:`forward`)."""
        return True

    def lossy_merge(self, module: nn.Module) -> bool:
        """True when a merge requantizes (its error is measured and warned about)."""
        return True

    # -- writing -------------------------------------------------------------------------------------
    def requantize(self, module: nn.Module, dense: torch.Tensor) -> None:
        """Write dense (d_out, d_in) into the layer in its own format (round to nearest, fresh scales)."""
        raise NotImplementedError

    def rounding_grid(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """After :meth:`requantize`: (per-element scale S (d_out, d_in), sorted levels L) of the stored weight,
        so that every stored value is ``L[k] · S_ij``; None when the format cannot be re-rounded."""
        return None

    def rounding_offset(self, module: nn.Module) -> torch.Tensor | None:
        """After :meth:`requantize`: the per-element offset Z (d_out, d_in) of an asymmetric format, whose stored
        values are ``L[k] · S_ij + Z_ij`` (torchao int4's zero points); None when there is none (``Z = 0``)."""
        return None

    def write_levels(self, module: nn.Module, codes: torch.Tensor) -> None:
        """Store the level indices ``codes`` (d_out, d_in; into :meth:`rounding_grid`'s L) keeping the scales."""
        raise NotImplementedError

    def requantize_accurate(
        self, module: nn.Module, dense: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01
    ) -> None:
        """Requantize ``dense`` choosing the rounding that minimises the output error on a calibration batch
        (``hessian`` = XᵀX / n, (d_in, d_in)): the scales (and offsets) of the plain requantization, levels by
        :func:`gptq_round` (``damp``: its damping). With an offset Z the grid ``L · S + Z`` is the grid ``L · S``
        shifted by Z, so W − Z is rounded on ``L · S``: the same errors, hence the same error feedback."""
        self.requantize(module, dense)
        grid = self.rounding_grid(module)
        if grid is None:
            raise MergeError(
                f"requantize='accurate' is not available for {self.name} {self.scheme(module)} layers; "
                f"use requantize='plain' or dequantize first"
            )
        scale, levels = grid
        offset = self.rounding_offset(module)
        target = dense.float() if offset is None else dense.float() - offset.float()
        codes = gptq_round(target, hessian.to(dense.device), scale, levels, damp=damp)
        self.write_levels(module, codes)

    def snapshot(self, module: nn.Module) -> dict[str, Any]:
        """The stored weight and its quantization state, by reference (a requantize replaces, never mutates)."""
        return {"weight": module.weight}

    def restore(self, module: nn.Module, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key == "weight":
                module.weight = value
            else:
                setattr(module, key, value)

    # -- bytes ---------------------------------------------------------------------------------------
    def weight_bytes(self, module: nn.Module) -> int:
        """Bytes the layer stores for its weight (packed data and every constant; not the bias)."""
        raise NotImplementedError

    def bytes_for(self, d_out: int, d_in: int, scheme: str, **opts) -> int:
        """Bytes of one (d_out, d_in) weight stored with ``scheme`` (for the estimator)."""
        raise NotImplementedError


_BACKENDS: dict[str, QuantBackend] = {}


def register_backend(backend: QuantBackend) -> QuantBackend:
    _BACKENDS[backend.name] = backend
    return backend


def backends() -> dict[str, QuantBackend]:
    """Every registered backend by name."""
    return dict(_BACKENDS)


def get_backend(name: str) -> QuantBackend:
    if name not in _BACKENDS:
        raise ConfigError(f"unknown quantization backend {name!r}; known: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]


def backend_of(module: nn.Module) -> QuantBackend | None:
    """The backend owning ``module``, or None for a plain (float) layer."""
    for backend in _BACKENDS.values():
        if backend.owns(module):
            return backend
    return None


def is_quantized_layer(module: nn.Module) -> bool:
    return backend_of(module) is not None


# ---- error-feedback rounding --------------------------------------------------------------------------


@torch.no_grad()
def gptq_round(
    target: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    levels: torch.Tensor,
    damp: float = 0.01,
    block: int = 128,
) -> torch.Tensor:
    r"""Level indices (d_out, d_in) for ``target`` W (d_out, d_in) on the grid ``levels[k] · scale_ij``,
    chosen to minimise the output error ``tr((Q − W) H (Q − W)ᵀ)`` for H = XᵀX / n (GPTQ, Frantar et al.,
    arXiv:2210.17323): columns are rounded one at a time and each one's error is spread over the columns
    not yet rounded through the Cholesky factor of H⁻¹ (damped by ``damp`` · mean diag H).
    """
    w = target.clone().float()
    d_out, d_in = w.shape
    h = hessian.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(d_in, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    levels = levels.float().to(w.device)
    mids = (levels[1:] + levels[:-1]) / 2
    scale = scale.float()
    codes = torch.empty(d_out, d_in, dtype=torch.long, device=w.device)

    def nearest(col: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        v = torch.where(s > 0, col / s.clamp_min(1e-30), torch.zeros_like(col))
        return torch.bucketize(v.contiguous(), mids)

    for i1 in range(0, d_in, block):
        i2 = min(i1 + block, d_in)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            s = scale[:, i1 + i]
            k = nearest(col, s)
            codes[:, i1 + i] = k
            q = levels[k] * s
            err = (col - q) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


def output_error(stored: torch.Tensor, target: torch.Tensor, hessian: torch.Tensor) -> float:
    """RMS of X (stored − target)ᵀ over a calibration batch with H = XᵀX / n, relative to the RMS of X targetᵀ."""
    e = (stored.float() - target.float()).to(hessian.device)
    t = target.float().to(hessian.device)
    num = torch.einsum("oi,ij,oj->", e, hessian, e).clamp_min(0).item()
    den = torch.einsum("oi,ij,oj->", t, hessian, t).clamp_min(1e-30).item()
    return math.sqrt(num / den)


# ---- merge handler: requantize and measure -------------------------------------------------------------

_LOCAL = threading.local()


def quiet_merge_warnings(flag: bool) -> bool:
    """Silence the per-layer merge warning (model-level reports warn once); returns the old flag."""
    old = getattr(_LOCAL, "quiet", False)
    _LOCAL.quiet = flag
    return old


class requantize_mode:
    """Context: merges inside it requantize with ``mode`` (``"plain"`` or ``"accurate"``), the latter with the
    calibration Hessians ``{id(base layer): H}`` and the damping ``damp``; ``validation`` Hessians (same keys,
    from inputs the rounding never saw) are only measured on."""

    def __init__(
        self,
        mode: str,
        hessians: dict[int, torch.Tensor] | None = None,
        validation: dict[int, torch.Tensor] | None = None,
        damp: float = 0.01,
    ) -> None:
        if mode not in REQUANTIZE_MODES:
            raise ConfigError(f"requantize must be one of {REQUANTIZE_MODES}, got {mode!r}")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (0 <= damp < math.inf):
            raise ConfigError(f"damp must be a finite number >= 0, got {damp!r}")
        self.mode, self.hessians, self.validation, self.damp = mode, hessians or {}, validation or {}, float(damp)

    def __enter__(self):
        self.old = getattr(_LOCAL, "mode", None)
        _LOCAL.mode = self
        return self

    def __exit__(self, *exc):
        _LOCAL.mode = self.old


def _probe(d_in: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(PROBE_ROWS, d_in, generator=gen).to(device)


def _dequantize(module: nn.Module) -> torch.Tensor:
    return backend_of(module).dequantize(module)


@torch.no_grad()
def set_and_measure(module: nn.Module, dense: torch.Tensor) -> None:
    """Requantize ``dense`` into ``module`` (plain, or accurate inside :class:`requantize_mode`) and record
    ``module.peftlab_merge_error = {"max_abs", "mean_abs", "rel", "bits", "scheme"}`` on the Gaussian probe
    (rel = mean |E| / mean |X W_targetᵀ|), plus ``"calib_rel_plain"`` / ``"calib_rel"`` (relative RMS output
    error on the calibration batch, :func:`output_error`) when a calibration Hessian is known, and
    ``"valid_rel_plain"`` / ``"valid_rel"`` (the same on a validation batch the rounding never saw)."""
    backend = backend_of(module)
    target = dense.float()
    mode = getattr(_LOCAL, "mode", None)
    hessian = mode.hessians.get(id(module)) if mode is not None else None
    valid = mode.validation.get(id(module)) if mode is not None else None
    report: dict[str, Any] = {}
    backend.requantize(module, dense)
    if valid is not None:
        report["valid_rel_plain"] = output_error(backend.dequantize(module), target, valid)
    if hessian is not None:
        report["calib_rel_plain"] = output_error(backend.dequantize(module), target, hessian)
        if mode.mode == "accurate":
            backend.requantize_accurate(module, dense, hessian, damp=mode.damp)
        report["calib_rel"] = output_error(backend.dequantize(module), target, hessian)
    if valid is not None:
        report["valid_rel"] = output_error(backend.dequantize(module), target, valid)
    stored = backend.dequantize(module).float()
    x = _probe(target.shape[1], target.device)
    ref = x @ target.t()
    err = (x @ stored.t() - ref).abs()
    scheme = backend.scheme(module)
    report.update({
        "max_abs": err.max().item(),
        "mean_abs": err.mean().item(),
        "rel": err.mean().item() / max(ref.abs().mean().item(), 1e-12),
        "bits": 8 if scheme == "int8" else (4 if scheme in ("nf4", "fp4", "int4", "mxfp4") else None),
        "scheme": f"{backend.name}:{scheme}",
        "requantize": mode.mode if mode is not None else "plain",
    })  # fmt: skip
    module.peftlab_merge_error = report
    if backend.lossy_merge(module) and report["max_abs"] > 0 and not getattr(_LOCAL, "quiet", False):
        label = f"{backend.name} {scheme}" if scheme != backend.name else scheme  # "fp8", "mxfp4": no repeat
        label = "int8 (LLM.int8)" if scheme == "int8" and backend.name == "bitsandbytes" else label
        warnings.warn(
            f"merging into {'an' if label.startswith('int8') else 'a'} {label} base layer {list(target.shape)} is not exact: requantizing "
            f"W + ΔW changed the layer outputs on a Gaussian probe batch by max {report['max_abs']:.3g}, "
            f"mean {report['mean_abs']:.3g} ({100 * report['rel']:.2f}% of the mean output). Unmerge restores "
            f"the original weights exactly; peftlab.unwrap(model, merge=True, dequantize=True) gives an exact "
            f"full-precision merge.",
            stacklevel=4,
        )


def _snapshot(module: nn.Module) -> dict[str, Any]:
    record = backend_of(module).snapshot(module)
    record["peftlab_merge_error"] = getattr(module, "peftlab_merge_error", None)
    return record


def _restore(module: nn.Module, record: dict[str, Any]) -> None:
    record = dict(record)
    error = record.pop("peftlab_merge_error", None)
    backend_of(module).restore(module, record)
    if error is None:
        module.__dict__.pop("peftlab_merge_error", None)
    else:
        module.peftlab_merge_error = error


register_weight_handler(is_quantized_layer, _dequantize, set_and_measure, _snapshot, _restore)
register_linear_predicate(is_quantized_layer)  # a backend's own layer type (FP8 blocks) is a LoRA target too
