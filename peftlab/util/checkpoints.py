"""Reading a model's safetensors checkpoint tensor by tensor, and giving freed memory back to the system."""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import torch

from .errors import ConfigError


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
