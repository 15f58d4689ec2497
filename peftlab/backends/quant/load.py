"""Streaming quantized loading: safetensors -> bitsandbytes linears, one tensor at a time.

:func:`load_quantized` builds the model skeleton on the ``meta`` device (no memory), then reads
the checkpoint with ``safe_open`` tensor by tensor. Each linear weight is quantized as soon as
it (and its bias) has arrived and the float copy is dropped, so peak memory is about the
quantized model plus one float weight, never the full-precision model. Embeddings, norms and
the output head stay in ``dtype`` (full precision by default). Parameters missing from the
checkpoint (e.g. a new classification head) and non-persistent buffers (rotary frequencies,
position ids) are then initialised by the model's own ``_init_weights``, as
``from_pretrained`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from ...core.state import replace_module
from ...core.structure import head_module_names
from ...util.checkpoints import (
    checkpoint_keys,
    limit_heap_retention,
    read_tensor,
    release_freed_memory,
    safetensors_files,
)
from ...util.models import auto_class, resolve_model_path
from .base import get_backend
from .bnb import check_quant_args, require_bnb

KINDS = ("causal-lm", "seq-cls", "token-cls", "base")


def _key_mapper(model: nn.Module):
    """Map a checkpoint key onto the model's state-dict key (adding/removing ``base_model_prefix``)."""
    keys = set(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "") or ""

    def mapped(key: str) -> str | None:
        if key in keys:
            return key
        if prefix and f"{prefix}.{key}" in keys:
            return f"{prefix}.{key}"
        if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in keys:
            return key[len(prefix) + 1 :]
        return None

    return mapped


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name`` (keeping requires_grad)."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(
            value, requires_grad=bool(old is not None and old.requires_grad)
        )
        module._parameters[attr]._is_hf_initialized = True
    else:
        value._is_hf_initialized = True
        module._buffers[attr] = value


def _cast(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


def plan_linears(model: nn.Module, skip_modules: list[str] | None) -> dict[str, nn.Module]:
    """Linear layers to quantize: every ``nn.Linear``/``Conv1D`` except the output head(s) and ``skip_modules``.

    ``skip_modules`` entries match a module path exactly or as a dotted suffix (``"lm_head"``,
    ``"mlp.down_proj"``) or as any path component (``"classifier"`` skips its sub-layers too).
    """
    from transformers.pytorch_utils import Conv1D

    heads = head_module_names(model)
    skip = list(skip_modules or [])
    plan = {}
    for path, module in model.named_modules():
        if type(module) is not nn.Linear and not isinstance(module, Conv1D):
            continue
        if path in heads:
            continue
        parts = path.split(".")
        if any(path == s or path.endswith("." + s) or s in parts for s in skip):
            continue
        plan[path] = module
    return plan


def quantized_linear(
    module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, opts: dict
) -> nn.Module:
    """The quantized replacement of float ``module`` with ``weight`` (d_out, d_in); Conv1D transposed.

    ``opts["backend"]`` (default bitsandbytes) builds it with ``opts["scheme"]`` (bitsandbytes: from
    ``bits`` / ``quant_type``).
    """
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        weight = weight.t()
    backend = get_backend(opts.get("backend", "bitsandbytes"))
    return backend.quantize_linear(weight, bias, resolve_scheme(opts), opts)


def resolve_scheme(opts: dict) -> str:
    """The backend scheme of quantization options: ``scheme`` when given, else from ``bits`` / ``quant_type``."""
    if opts.get("scheme"):
        return opts["scheme"]
    backend = opts.get("backend", "bitsandbytes")
    if backend in ("fp8", "mxfp4"):
        return backend
    if opts.get("bits", 4) == 8:
        return "int8"
    return opts.get("quant_type", "nf4") if backend == "bitsandbytes" else "int4"


def check_backend_args(opts: dict) -> None:
    """Validate backend, scheme and its options (ConfigError says what is valid); the library must import."""
    name = opts.get("backend", "bitsandbytes")
    backend = get_backend(name)
    if name == "bitsandbytes":
        if opts.get("scheme") and opts["scheme"] not in backend.schemes:
            backend.check_options(opts["scheme"], opts)
        check_quant_args(opts.get("bits", 4), opts.get("quant_type", "nf4"), opts.get("blocksize", 64))
        require_bnb()
        return
    backend.check_options(resolve_scheme(opts), opts)


def load_quantized(
    name_or_path: str,
    bits: int = 4,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules: list[str] | None = None,
    device: str | torch.device | None = None,
    kind: str = "causal-lm",
    dtype: torch.dtype = torch.float32,
    blocksize: int = 64,
    int8_threshold: float = 6.0,
    backend: str = "bitsandbytes",
    scheme: str | None = None,
    group_size: int = 64,
    **config_kwargs,
) -> nn.Module:
    """Load a transformers model with its linear layers quantized (bitsandbytes int8 / 4-bit by default).

    Args:
        name_or_path: packaged short name (``"smollm2-135m"``) or a local folder with a
            safetensors checkpoint.
        bits: 4 (NF4/FP4, QLoRA) or 8 (LLM.int8).
        quant_type: ``"nf4"`` or ``"fp4"`` (4-bit only).
        double_quant: quantize the 4-bit absmax constants too (≈0.37 bits/param saved).
        compute_dtype: dtype the 4-bit matmul runs in (default: the input's dtype).
        skip_modules: linear layers to keep in full precision, besides the output head(s).
        device: where the model goes (default: CUDA when available, else CPU).
        kind: ``"causal-lm"``, ``"seq-cls"``, ``"token-cls"`` or ``"base"``.
        dtype: dtype of everything not quantized (embeddings, norms, head); fp32 by default.
        blocksize: 4-bit block size (64 as QLoRA). int8_threshold: LLM.int8 outlier threshold.
        backend: ``"bitsandbytes"``, ``"torchao"`` (scheme ``"int8"`` / ``"int4"`` / ``"float8"``, CUDA sm_89+
            for float8) ``"fp8"`` (block-scaled e4m3, 128 × 128) or ``"mxfp4"`` (e2m1 in blocks of 32, e8m0 scales). scheme: the backend's scheme (default
            from ``bits`` / ``quant_type``). group_size: torchao int4 group size.
        config_kwargs: passed to ``AutoConfig.from_pretrained`` (e.g. ``num_labels=2``).

    Returns:
        The model in eval mode, every parameter frozen; ``model.peftlab_quantization``
        records the settings and the keys that were missing from / unused in the checkpoint.
    """
    from transformers import AutoConfig

    opts = {
        "bits": bits, "quant_type": quant_type, "double_quant": double_quant, "compute_dtype": compute_dtype,
        "blocksize": blocksize, "int8_threshold": int8_threshold, "dtype": dtype, "backend": backend,
        "scheme": scheme, "group_size": group_size,
    }  # fmt: skip
    check_backend_args(opts)
    opts["scheme"] = resolve_scheme(opts)
    path = resolve_model_path(name_or_path)
    files = safetensors_files(path)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    with torch.device("meta"):
        model = auto_class(kind).from_config(config, dtype=dtype)
    plan = plan_linears(model, skip_modules)
    mapped = _key_mapper(model)
    opts["device"] = device

    pending: dict[str, dict[str, torch.Tensor]] = {}
    loaded: set[str] = set()
    unused: list[str] = []
    for file, key in checkpoint_keys(files):
        name = mapped(key)
        if name is None:
            unused.append(key)
            continue
        owner, _, attr = name.rpartition(".")
        loaded.add(name)
        tensor = read_tensor(file, key)
        if owner in plan:
            parts = pending.setdefault(owner, {})
            parts[attr] = tensor
            if "weight" in parts and ("bias" in parts or plan[owner].bias is None):
                _install(model, owner, plan.pop(owner), pending.pop(owner), opts)
                del parts, tensor
                release_freed_memory()
        else:
            _set_tensor(model, name, _cast(tensor, dtype, device))
    for owner, module in list(plan.items()):  # quantization targets not (fully) in the checkpoint
        _install(model, owner, module, pending.pop(owner, {}), opts, init_missing=True)

    missing = _finish(model, loaded, device)
    if device.type == "cpu" and opts["scheme"] in ("nf4", "fp4", "int4"):
        limit_heap_retention()  # the per-step dequantized temporaries would otherwise pile up in glibc's heap
    model.peftlab_quantization = {
        **{k: v for k, v in opts.items() if k not in ("device",)},
        "skip_modules": list(skip_modules or []),
        "missing_keys": missing,
        "unused_keys": unused,
    }
    return model.eval()


def _install(
    model: nn.Module, path: str, module: nn.Module, parts: dict, opts: dict, init_missing=False
) -> None:
    """Quantize ``parts`` (weight, bias) into a bitsandbytes layer at ``path``; the float copies are dropped."""
    if "weight" not in parts or (module.bias is not None and "bias" not in parts):
        if not init_missing:
            return
        # not in the checkpoint: initialise a float layer the way the model does, then quantize it
        float_layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        model._init_weights(float_layer)
        parts = {
            "weight": parts.get("weight", float_layer.weight.data),
            "bias": parts.get("bias", float_layer.bias),
        }
    bias = parts.get("bias")
    layer = quantized_linear(
        module, parts["weight"].float(), bias.float() if bias is not None else None, opts
    )
    layer._is_hf_initialized = True
    for p in layer.parameters():
        p._is_hf_initialized = True
    replace_module(model, path, layer)


def _finish(model: nn.Module, loaded: set[str], device: torch.device) -> list[str]:
    """Tie weights, materialise what the checkpoint did not hold and initialise it; freeze. Returns missing keys."""
    model.tie_weights()
    missing = []
    for module_path, module in model.named_modules():
        complete = True
        for attr, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None or tensor.device.type != "meta":
                continue
            complete = False
            full = f"{module_path}.{attr}" if module_path else attr
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(
                    torch.empty_like(tensor, device=device), requires_grad=False
                )
                missing.append(full)
            else:
                module._buffers[attr] = torch.empty_like(tensor, device=device)
        if complete and not getattr(module, "_is_hf_initialized", False):
            own = list(module._parameters.values()) + list(module._buffers.values())
            if own and all(getattr(t, "_is_hf_initialized", False) for t in own if t is not None):
                module._is_hf_initialized = True
    model.initialize_weights()
    model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(False)
    for t in list(model.parameters()) + list(model.buffers()):
        if hasattr(t, "_is_hf_initialized"):
            del t._is_hf_initialized
    missing = [m for m in missing if m not in loaded]
    if missing:
        import warnings

        warnings.warn(
            f"load_quantized: {len(missing)} parameter(s) not in the checkpoint were newly initialised: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}",
            stacklevel=3,
        )
    return missing
