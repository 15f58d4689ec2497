"""Files we write and read: atomic writes (a temporary file in the same folder, then ``os.replace``),
a folder lock, and readers that turn a missing or corrupt file into a clear :class:`AdapterFileError`.
Only safetensors and JSON are ever read or written (no pickle)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import AdapterFileError


def _umask_mode() -> int:
    """The mode a plain ``open(..., 'w')`` would give (0o666 & ~umask), as ``save_pretrained`` files get."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    _atomic(Path(path), write)


def atomic_save_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        save_file(clean, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())

    _atomic(Path(path), write)


@contextlib.contextmanager
def folder_lock(path: Path):
    """An exclusive advisory lock beside ``path`` (``.<name>.lock``): concurrent writers into one folder serialise."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: no advisory lock
            pass
        yield


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return sorted(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, corrupt or truncated file is an :class:`AdapterFileError`."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"adapter weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(
            f"adapter weights file {path} is corrupt or truncated ({exc}); re-save or re-download it"
        ) from None


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(
            f"config file {path} does not exist (expected {path.name} in {path.parent})"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"adapter config {path} is not valid JSON: {exc}") from None
