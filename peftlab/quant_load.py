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

import ctypes
import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .inject import replace_module
from .models import auto_class, resolve_model_path
from .quant_layers import check_quant_args, make_4bit_linear, make_8bit_linear, require_bnb
from .targeting import head_module_names

KINDS = ("causal-lm", "seq-cls", "token-cls", "base")


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """The checkpoint's ``.safetensors`` files (sharded via ``model.safetensors.index.json`` or single)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"load_quantized needs a local model folder or a packaged name, got {str(path)!r}")
    if not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        raise ConfigError(
            f"{folder} is an adapter folder (adapter_config.json, no config.json), not a base model: "
            "load_quantized(<base model>) first, then peftlab.load_adapter(model, folder)"
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:12])
        raise ConfigError(
            f"no .safetensors checkpoint in {folder} (found: {present}); load_quantized streams safetensors "
            f"only. For other formats load the model first and call peftlab.quantize(model, ...)"
        )
    return files


def checkpoint_keys(files: list[Path]) -> list[tuple[Path, str]]:
    """(file, key) of every tensor in the checkpoint, in file order."""
    from safetensors import safe_open

    out = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            out.extend((file, key) for key in reader.keys())
    return out


def read_tensor(file: Path, key: str) -> torch.Tensor:
    """One tensor, read with its own ``safe_open``.

    safetensors memory-maps the file; pages touched while reading stay mapped (and count in
    the process RSS) until the file is closed, so keeping one reader open over the whole
    checkpoint would map all of it. Opening per tensor costs one header parse.
    """
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as reader:
        return reader.get_tensor(key)


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Quantizing allocates and frees many temporaries of a few MB each; glibc keeps them in its
    heap, which would make the process grow to nearly the fp32 size even though the memory
    is free.
    """
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None

#: glibc ``M_MMAP_THRESHOLD`` (mallopt parameter number).
_M_MMAP_THRESHOLD = -3
#: Allocations from this size up get their own mmap on CPU QLoRA runs (env ``PEFTLAB_MMAP_THRESHOLD``, 0: off).
MMAP_THRESHOLD = 1 << 20


def limit_heap_retention(threshold: int | None = None) -> bool:
    """Serve allocations of ``threshold`` bytes and more by their own mmap (glibc ``mallopt``), for the process.

    Training on a 4-bit base on the CPU dequantizes every weight twice a step (forward, input-gradient
    backward) through temporaries of many sizes (bitsandbytes: int32 codes, fp32 values, the scaled
    copy: 3 × 46 MB for one 5632×2048 weight). glibc's dynamic mmap threshold climbs to 32 MB after the
    first large frees, so these land in its heap, and the heap keeps what they fragment: on the
    672M-parameter Llama (2×128 tokens, r=16) that held ~0.8-1 GB of freed memory (anonymous RSS after
    three steps 1734 MB, 711 MB with a fixed 1 MB threshold; process peak 2423 vs 1813 MB; a 4 MB threshold
    left the peak at 2340 MB: the half-MB uint8 and 2 MB activation temporaries fragment too). A fixed
    threshold also turns the dynamic adjustment off. Large blocks then go back to the OS when freed (at
    the cost of zeroing fresh pages on their next use). Returns False where mallopt is not available.
    """
    global _LIBC
    if threshold is None:
        threshold = int(os.environ.get("PEFTLAB_MMAP_THRESHOLD", MMAP_THRESHOLD))
    if threshold <= 0:
        return False
    if _LIBC is None:
        release_freed_memory()  # loads libc
    if not _LIBC or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


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
    """The bitsandbytes replacement of float ``module`` with ``weight`` (d_out, d_in); Conv1D transposed."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        weight = weight.t()
    device = opts["device"]
    if opts["bits"] == 4:
        return make_4bit_linear(
            weight, bias, quant_type=opts["quant_type"], double_quant=opts["double_quant"],
            compute_dtype=opts["compute_dtype"], blocksize=opts["blocksize"], device=device,
        )  # fmt: skip
    return make_8bit_linear(
        weight,
        bias,
        threshold=opts["int8_threshold"],
        device=device,
        bias_dtype=opts["compute_dtype"] or opts["dtype"],
    )


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
    **config_kwargs,
) -> nn.Module:
    """Load a transformers model with its linear layers in bitsandbytes int8 or 4-bit.

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
        config_kwargs: passed to ``AutoConfig.from_pretrained`` (e.g. ``num_labels=2``).

    Returns:
        The model in eval mode, every parameter frozen; ``model.peftlab_quantization``
        records the settings and the keys that were missing from / unused in the checkpoint.
    """
    from transformers import AutoConfig

    check_quant_args(bits, quant_type, blocksize)
    require_bnb()
    path = resolve_model_path(name_or_path)
    files = safetensors_files(path)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    with torch.device("meta"):
        model = auto_class(kind).from_config(config, dtype=dtype)
    plan = plan_linears(model, skip_modules)
    mapped = _key_mapper(model)
    opts = {
        "bits": bits, "quant_type": quant_type, "double_quant": double_quant, "compute_dtype": compute_dtype,
        "blocksize": blocksize, "int8_threshold": int8_threshold, "device": device, "dtype": dtype,
    }  # fmt: skip

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
    if device.type == "cpu" and bits == 4:
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
