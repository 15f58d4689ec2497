"""Merging an adapter into a quantized base, with the rounding error measured per layer and on the outputs.

Each quantized base layer is dequantized, ΔW is added in fp32 and the sum requantized; plain float bases
merge exactly. ``requantize="accurate"`` rounds W + ΔW by error feedback on a calibration batch instead
(:func:`peftlab.backends.quant.base.gptq_round`: the scales of the plain requantization, the levels chosen
to minimise the layer's output error on the batch). Either way the original packed weights are kept, so
``unmerge`` restores them bit for bit.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..api import disable_adapters, merge
from ..backends.quant.base import REQUANTIZE_MODES, is_quantized_layer, quiet_merge_warnings, requantize_mode
from ..core.state import get_state, wrapped_layers
from ..util.errors import ConfigError


def _output_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"cannot find an output tensor in {type(out).__name__}; pass probe inputs that give logits"
    )


@torch.no_grad()
def _run(model: nn.Module, probe: Any) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        out = model(**probe) if isinstance(probe, dict) else model(probe)
    finally:
        model.train(was_training)
    return _output_tensor(out).float()


def merge_error_report(model: nn.Module, adapter_name: str | None = None) -> dict[str, Any]:
    """Per-layer rounding error recorded by the last merge into each quantized base layer.

    Each layer's entry is ``{"max_abs", "mean_abs", "rel", "bits"}``: the change of that
    layer's output on a fixed Gaussian probe batch X (16, d_in) between the exact merged
    weight W + ΔW and what requantization stored, ``X (Ŵ - (W + ΔW))ᵀ``.
    """
    layers = {}
    for path, layer in wrapped_layers(model, adapter_name):
        err = getattr(layer.base_layer, "peftlab_merge_error", None)
        merged = layer.is_merged(adapter_name) if adapter_name else bool(layer.merged_stack)
        if err is not None and merged:
            layers[path] = dict(err)
    report: dict[str, Any] = {"layers": layers}
    if layers:
        report["layer_max_abs"] = max(e["max_abs"] for e in layers.values())
        report["layer_mean_abs"] = sum(e["mean_abs"] for e in layers.values()) / len(layers)
        report["layer_rel"] = sum(e["rel"] for e in layers.values()) / len(layers)
    return report


@torch.no_grad()
def calibration_hessians(model: nn.Module, batches: Any, adapter_name: str | None = None) -> dict[int, torch.Tensor]:
    """``{id(base layer): H = XᵀX / n}`` (d_in, d_in) fp32 for every quantized base under an adapter, X the
    layer inputs over ``batches`` (a batch dict / tensor, or a list of them) run through the model as it is
    (adapters active). Memory: Σ d_in² · 4 bytes."""
    sums: dict[int, list] = {}
    handles = []
    for _, layer in wrapped_layers(model, adapter_name):
        base = layer.base_layer
        if not is_quantized_layer(base):
            continue

        def hook(module, args, base=base):
            x = args[0].detach()
            x2 = x.reshape(-1, x.shape[-1]).float()
            entry = sums.setdefault(id(base), [torch.zeros(x2.shape[1], x2.shape[1], device=x2.device), 0])
            entry[0].addmm_(x2.t(), x2)
            entry[1] += x2.shape[0]

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        for batch in batches if isinstance(batches, list) else [batches]:
            _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {key: total / max(n, 1) for key, (total, n) in sums.items()}


def merge_quantized(
    model: nn.Module,
    probe_inputs: Any = None,
    adapter_name: str | None = None,
    safe: bool = False,
    requantize: str = "plain",
    calibration: Any = None,
    validation: Any = None,
    damp: float = 0.01,
) -> dict[str, Any]:
    """Merge an adapter into a (partly) quantized base and report the measured rounding error.

    Each quantized base layer is dequantized, ΔW is added in fp32 and the sum requantized
    (plain float bases merge exactly). With ``probe_inputs`` (a batch dict or tensor), the
    model outputs (logits) are compared on it before and after the merge:

    * ``max_abs`` / ``mean_abs``: |out_merged - out_adapter| (the merge error);
    * ``adapter_effect_mean_abs``: mean |out_adapter - out_base|, what the adapter changes,
      to judge the error against;
    * ``rel``: mean_abs / mean |out_adapter|.

    Per-layer errors (see :func:`merge_error_report`) are always included. The report is also
    stored in ``get_state(model).info["merge_error"]``. For int8 bases, whose merge can never
    be exact, one warning with the measured numbers is issued.

    ``requantize``: ``"plain"`` (round to nearest, the default) or ``"accurate"`` (error-feedback rounding
    that minimises each layer's output error on ``calibration``, a batch or a list of batches; default the
    probe inputs). With a calibration batch, every layer also reports ``calib_rel_plain`` and ``calib_rel``:
    the relative RMS output error on it of the plain and of the stored requantization; the model-level
    ``calib_rel_plain_mean`` / ``calib_rel_mean`` and ``layers_halved`` (how many layers at most half
    the plain error) summarise them.

    ``validation`` (a batch or list of batches the rounding does not see): every layer also reports
    ``valid_rel_plain`` / ``valid_rel`` on it, summarised as ``valid_rel_plain_mean`` / ``valid_rel_mean`` and
    ``valid_layers_halved``: whether the accurate rounding generalises beyond its calibration inputs.
    ``damp``: the error-feedback rounding's damping of H, as a fraction of its mean diagonal (default 0.01;
    larger trusts a small calibration set less).
    """
    if requantize not in REQUANTIZE_MODES:
        raise ConfigError(f"requantize must be one of {REQUANTIZE_MODES}, got {requantize!r}")
    state = get_state(model, adapter_name)
    name = state.config.adapter_name
    calibration = calibration if calibration is not None else probe_inputs
    if requantize == "accurate" and calibration is None:
        raise ConfigError("requantize='accurate' needs a calibration batch: pass calibration= (or probe_inputs=)")
    hessians = calibration_hessians(model, calibration, name) if calibration is not None else {}
    valid = calibration_hessians(model, validation, name) if validation is not None else {}
    before = base = None
    if probe_inputs is not None:
        before = _run(model, probe_inputs)
        with disable_adapters(model, name):
            base = _run(model, probe_inputs)
    old = quiet_merge_warnings(True)
    try:
        with requantize_mode(requantize, hessians, valid, damp):
            merge(model, name, safe=safe)
    finally:
        quiet_merge_warnings(old)
    report = merge_error_report(model, name)
    report["quantized_layers"] = len(report["layers"])
    report["requantize"] = requantize
    calib = [e for e in report["layers"].values() if "calib_rel" in e]
    if calib:
        report["calib_rel_plain_mean"] = sum(e["calib_rel_plain"] for e in calib) / len(calib)
        report["calib_rel_mean"] = sum(e["calib_rel"] for e in calib) / len(calib)
        report["layers_halved"] = sum(e["calib_rel"] <= 0.5 * e["calib_rel_plain"] for e in calib)
    checked = [e for e in report["layers"].values() if "valid_rel" in e]
    if checked:
        report["valid_rel_plain_mean"] = sum(e["valid_rel_plain"] for e in checked) / len(checked)
        report["valid_rel_mean"] = sum(e["valid_rel"] for e in checked) / len(checked)
        report["valid_layers_halved"] = sum(e["valid_rel"] <= 0.5 * e["valid_rel_plain"] for e in checked)
    if before is not None:
        after = _run(model, probe_inputs)
        diff = (after - before).abs()
        report["max_abs"] = diff.max().item()
        report["mean_abs"] = diff.mean().item()
        report["rel"] = report["mean_abs"] / max(before.abs().mean().item(), 1e-12)
        report["adapter_effect_mean_abs"] = (before - base).abs().mean().item()
    state.info["merge_error"] = {k: v for k, v in report.items() if k != "layers"}
    int8 = any(e.get("bits") == 8 for e in report["layers"].values())
    if int8 and report.get("layer_max_abs", 0) > 0:
        where = (
            f"model outputs on the probe batch changed by max {report['max_abs']:.3g}, mean {report['mean_abs']:.3g}"
            if before is not None
            else f"layer outputs on a Gaussian probe changed by max {report['layer_max_abs']:.3g}, "
            f"mean {report['layer_mean_abs']:.3g}"
        )
        warnings.warn(
            f"merging adapter {name!r} into {report['quantized_layers']} int8 base layer(s) is not exact: {where}. "
            f"Use peftlab.unwrap(model, merge=True, dequantize=True) for an exact full-precision merge.",
            stacklevel=2,
        )
    return report
