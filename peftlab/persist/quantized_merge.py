"""Merging an adapter into a quantized base, with the rounding error measured per layer and on the outputs.

Each quantized base layer is dequantized, ΔW is added in fp32 and the sum requantized; plain float bases
merge exactly.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..api import disable_adapters, merge
from ..backends.quant.bnb import quiet_merge_warnings
from ..core.state import get_state, wrapped_layers


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


def merge_quantized(
    model: nn.Module, probe_inputs: Any = None, adapter_name: str | None = None, safe: bool = False
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
    """
    state = get_state(model, adapter_name)
    name = state.config.adapter_name
    before = base = None
    if probe_inputs is not None:
        before = _run(model, probe_inputs)
        with disable_adapters(model, name):
            base = _run(model, probe_inputs)
    old = quiet_merge_warnings(True)
    try:
        merge(model, name, safe=safe)
    finally:
        quiet_merge_warnings(old)
    report = merge_error_report(model, name)
    report["quantized_layers"] = len(report["layers"])
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
