r"""Quantized base weights (bitsandbytes int8 / NF4 / FP4) and the QLoRA recipe.

::

    load_quantized(path, bits=4) ──► model with Linear4bit/Linear8bitLt (streamed, never fp32 in full)
    quantize(model, bits=4)      ──► same for a model already in memory (e.g. GGUF-loaded)
    prepare_for_kbit_training    ──► norms in fp32, input grads on, gradient checkpointing
    wrap(model, LoraConfig())    ──► h = dequant(W_q) x + s·B A x   (W_q frozen, A, B fp32)
    merge_quantized(model, batch)──► W_q ← quant(dequant(W_q) + s·B A), error measured
    unwrap(merge=True, dequantize=True) ──► plain fp32 merged model (exact merge)

QLoRA (Dettmers et al., 2023, arXiv:2305.14314): ``Y = X · dequant(W_NF4)ᵀ + s · X Aᵀ Bᵀ``
with gradients flowing only into A and B. The storage formats are described in
:mod:`peftlab.backends.quant.bnb`; the streaming loader lives in :mod:`peftlab.backends.quant.load`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...core.state import adapters, replace_module
from ...util.checkpoints import release_freed_memory
from .base import MissingDependencyError, QuantizationError, backend_of, is_quantized_layer
from .bnb import is_bnb_linear, to_float_linear
from .load import check_backend_args, load_quantized, plan_linears, quantized_linear, resolve_scheme

__all__ = [
    "load_quantized",
    "quantize",
    "dequantize_model",
    "is_quantized",
    "prepare_for_kbit_training",
    "memory_report",
    "format_memory_report",
    "QuantizationError",
    "MissingDependencyError",
]


def is_quantized(model: nn.Module) -> bool:
    """True when any linear layer of ``model`` (adapter bases included) belongs to a quantization backend
    (bitsandbytes, torchao, FP8 block-scaled)."""
    return any(is_quantized_layer(m) for m in model.modules())


@torch.no_grad()
def quantize(
    model: nn.Module,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules: list[str] | None = None,
    device: str | torch.device | None = None,
    blocksize: int = 64,
    int8_threshold: float = 6.0,
    backend: str = "bitsandbytes",
    scheme: str | None = None,
    group_size: int = 64,
) -> nn.Module:
    """Replace the linear layers of an in-memory model by quantized layers, in place (bitsandbytes by default;
    ``backend="torchao"`` with ``scheme`` ``"int8"`` / ``"int4"`` / ``"float8"``, ``backend="fp8"`` or ``backend="mxfp4"``).

    For models ``load_quantized`` cannot stream (GGUF-loaded ones, models built in code).
    Each float weight is released as soon as its layer is quantized. The output head(s),
    embeddings and norms stay as they are. Arguments as :func:`load_quantized`; ``device``
    defaults to where each weight already is.

    Raises:
        ConfigError: bits / quant_type / blocksize invalid.
        QuantizationError: the model is already quantized, or already wrapped by peftlab.
        MissingDependencyError: the backend's library is not installed.
    """
    settings = {
        "bits": bits, "quant_type": quant_type, "double_quant": double_quant, "compute_dtype": compute_dtype,
        "blocksize": blocksize, "int8_threshold": int8_threshold, "backend": backend, "scheme": scheme,
        "group_size": group_size,
    }  # fmt: skip
    check_backend_args(settings)
    settings["scheme"] = resolve_scheme(settings)
    if is_quantized(model):
        kinds = sorted({type(m).__name__ for m in model.modules() if is_quantized_layer(m)})
        raise QuantizationError(
            f"{type(model).__name__} is already quantized ({', '.join(kinds)} layers); quantizing twice would "
            f"compound the rounding error. Load the full-precision model again, or call "
            f"peftlab.quant.dequantize_model(model) first"
        )
    if adapters(model):
        raise QuantizationError(
            "quantize() must run before peftlab.wrap(): the model already has adapter(s) "
            f"{', '.join(adapters(model))}; unwrap it, quantize, then wrap again"
        )
    plan = plan_linears(model, skip_modules)
    tied = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for path, module in plan.items():
        if id(module.weight) in tied:  # a linear sharing its weight with an embedding stays float
            continue
        opts = {**settings, "dtype": dtype,
                "device": torch.device(device) if device is not None else module.weight.device}
        bias = module.bias.detach().float() if module.bias is not None else None
        layer = quantized_linear(module, module.weight.detach().float(), bias, opts)
        layer.train(module.training)
        replace_module(model, path, layer)
        del module, bias
        release_freed_memory()
    model.peftlab_quantization = {**settings, "dtype": dtype, "skip_modules": list(skip_modules or [])}
    if device is not None:
        model.to(device)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized linear (including adapter ``base_layer``\\ s) by a float ``nn.Linear``.

    The weight is ``dequant(W_q)``: exactly what the quantized layer computed with, so a
    LoRA merged afterwards is exact. ``dtype`` defaults to the 4-bit source dtype / fp32.
    """
    for path, module in list(model.named_modules()):
        if is_bnb_linear(module):
            replace_module(model, path, to_float_linear(module, dtype))
        elif is_quantized_layer(module):
            replace_module(model, path, _float_linear(module, dtype))
    if hasattr(model, "peftlab_quantization"):
        del model.peftlab_quantization
    return model


def _float_linear(layer: nn.Module, dtype: torch.dtype | None) -> nn.Linear:
    """A plain ``nn.Linear`` holding the dequantized weight of a quantized layer (any backend), frozen."""
    weight = backend_of(layer).dequantize(layer)
    dtype = dtype or (weight.dtype if weight.dtype.is_floating_point and weight.element_size() >= 2 else torch.float32)
    bias = getattr(layer, "bias", None)
    d_out, d_in = weight.shape
    with torch.device("meta"):
        linear = nn.Linear(d_in, d_out, bias=bias is not None)
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=bias.requires_grad)
    return linear.train(layer.training)


def prepare_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """The QLoRA recipe around a quantized model, in place; call it before :func:`peftlab.wrap`.

    * every non-adapter parameter is frozen (when the model is not wrapped yet);
    * norm layers (LayerNorm / RMSNorm ...) are cast to fp32, for stable statistics when the
      rest runs in bf16/fp16; so are the other non-quantized float weights (embeddings, output
      head), since an fp32 norm hands fp32 activations to the layers after it (as HF PEFT);
    * the embedding output requires grad, so that checkpointed blocks whose inputs would
      otherwise carry no grad still back-propagate into the adapters;
    * gradient checkpointing is enabled (``use_cache`` off), trading compute for activations.
    """
    if not adapters(model):
        for p in model.parameters():
            p.requires_grad_(False)
    for module in model.modules():
        if is_quantized_layer(module):
            continue  # its bias follows the compute dtype
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()  # in place: tied parameters stay tied
    if use_gradient_checkpointing:
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if getattr(getattr(model, "config", None), "use_cache", None) is not None:
            model.config.use_cache = False
    return model


# ---- memory report ----------------------------------------------------------------------------------


def _quant_state_tensors(module: nn.Module, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Extra tensors a bitsandbytes weight needs besides its data (absmax, code tables, int8 row scales)."""
    out = []
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        out += [state.absmax, state.code, getattr(state, "offset", None)]
        if getattr(state, "state2", None) is not None:
            out += [state.state2.absmax, state.state2.code]
    if type(tensor).__name__ == "Int8Params":
        out.append(
            tensor.SCB if getattr(tensor, "SCB", None) is not None else getattr(module.state, "SCB", None)
        )
    return [t for t in out if isinstance(t, torch.Tensor)]


def logical_numel(tensor: torch.Tensor) -> int:
    """Elements of the logical (unpacked) weight: a 4-bit tensor packs two values per byte."""
    state = getattr(tensor, "quant_state", None)
    if state is not None and type(tensor).__name__ == "Params4bit":
        return int(torch.Size(state.shape).numel())
    return tensor.numel()


def memory_report(model: nn.Module) -> dict[str, Any]:
    """Bytes per module kind and bits per parameter, counting every stored tensor once.

    Includes quantization constants (4-bit absmax / double-quant tables, int8 row scales)
    and buffers; tied parameters count once. Params are *logical* counts (a 4-bit weight
    of shape (d_out, d_in) counts d_out·d_in even though it is packed two per byte).

    Returns:
        ``{"total_bytes", "total_mb", "params", "bits_per_param", "kinds": {kind: {"modules",
        "params", "bytes", "mb", "bits_per_param"}}, "quantized_linear": {...}}``; kind is the
        module class name; ``quantized_linear`` sums the bitsandbytes linears (weights, their
        constants and biases). MB = 10⁶ bytes.
    """
    seen: set[tuple[int, int]] = set()
    kinds: dict[str, dict[str, Any]] = {}
    qlin = {"modules": 0, "params": 0, "bytes": 0}

    def nbytes(t: torch.Tensor) -> int:
        key = (t.untyped_storage().data_ptr(), t.data_ptr()) if t.device.type != "meta" else (id(t), 0)
        if key in seen or t.numel() == 0:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    for module in model.modules():
        backend = backend_of(module)
        if backend is not None and backend.name != "bitsandbytes":  # the backend counts its weight and constants
            weight = module._parameters["weight"]
            key = (id(weight), 0)
            size = 0 if key in seen else backend.weight_bytes(module)
            seen.add(key)
            d_out, d_in = getattr(module, "out_features", None), getattr(module, "in_features", None)
            if d_out is None or d_in is None:
                d_out, d_in = weight.shape
            params = d_out * d_in if size else 0  # logical weights (an MXFP4 weight is stored packed, 3-D)
            for name, t in list(module._parameters.items()) + list(module._buffers.items()):
                if t is None or name in ("weight", "weight_scale_inv", "weight_scale"):
                    continue
                b = nbytes(t)
                size += b
                params += t.numel() if b and name in module._parameters else 0
            if size:
                entry = kinds.setdefault(type(module).__name__, {"modules": 0, "params": 0, "bytes": 0})
                for target in (entry, qlin):
                    target["modules"] += 1
                    target["bytes"] += size
                    target["params"] += params
            continue
        tensors = [(t, True) for t in module._parameters.values() if t is not None]
        tensors += [(t, False) for t in module._buffers.values() if t is not None]
        size = params = 0
        for t, is_param in tensors:
            b = nbytes(t)
            if b == 0:
                continue
            size += b + sum(nbytes(x) for x in _quant_state_tensors(module, t))
            params += logical_numel(t) if is_param else 0
        if size == 0:  # no tensors of its own, or only tied ones already counted
            continue
        entry = kinds.setdefault(type(module).__name__, {"modules": 0, "params": 0, "bytes": 0})
        entry["modules"] += 1
        entry["bytes"] += size
        entry["params"] += params
        if is_bnb_linear(module):
            qlin["modules"] += 1
            qlin["bytes"] += size
            qlin["params"] += params
    for entry in list(kinds.values()) + [qlin]:
        entry["mb"] = entry["bytes"] / 1e6
        entry["bits_per_param"] = 8 * entry["bytes"] / entry["params"] if entry["params"] else None
    total = sum(e["bytes"] for e in kinds.values())
    params = sum(e["params"] for e in kinds.values())
    return {
        "total_bytes": total,
        "total_mb": total / 1e6,
        "params": params,
        "bits_per_param": 8 * total / params if params else None,
        "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["bytes"])),
        "quantized_linear": qlin,
    }


def format_memory_report(report: dict[str, Any]) -> str:
    """A plain-text table of :func:`memory_report`'s result."""
    lines = [f"{'module kind':<28}{'modules':>8}{'params':>14}{'MB':>10}{'bits/param':>12}"]
    for kind, e in report["kinds"].items():
        bpp = f"{e['bits_per_param']:.3f}" if e["bits_per_param"] else "-"
        lines.append(f"{kind:<28}{e['modules']:>8}{e['params']:>14,d}{e['mb']:>10.2f}{bpp:>12}")
    bpp = f"{report['bits_per_param']:.3f}" if report["bits_per_param"] else "-"
    lines.append(f"{'total':<28}{'':>8}{report['params']:>14,d}{report['total_mb']:>10.2f}{bpp:>12}")
    return "\n".join(lines)


# ---- merging into a quantized base ------------------------------------------------------------------


