"""Files we write and read, confined to the folder they belong to.

* :func:`plain_name_in`: every file name that comes from a config (``weights`` in ``adapter_config.json``,
  the sub-folders named in ``adapters.json``, HF PEFT sub-folders) must be one plain name inside its
  folder. Anything else (a separator, ``..``, an absolute path, a link that leaves the folder) is refused
  with one message that says nothing about the disk: the same whether or not the target exists.
* :class:`FolderWriter`: the one way a save writes into an adapter folder. It holds an exclusive lock
  (``<folder>/.peftlab.lock``, opened without following links), writes every file into a private staging
  folder and renames it into place (a crash leaves the old or the new file, never half of one), and keeps
  a journal (in the lock file) of what it is creating, so the next save removes the leftovers of a killed
  save, and only those. It never removes a file that it (or a previous save) did not write.
* :func:`atomic_write_json` / :func:`atomic_save_safetensors`: a single atomic file write.
* :func:`read_safetensors` / :func:`read_json`: a missing or corrupt file is a clear :class:`AdapterFileError`.

Only safetensors and JSON are ever read or written (no pickle).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import AdapterFileError

LOCK_NAME = ".peftlab.lock"
STAGING_PREFIX = ".peftlab-staging-"
_STAGING = re.compile(r"\.peftlab-staging-[0-9a-f]{16}")


# ---- confinement ----------------------------------------------------------------------------------


def plain_name_in(folder: str | Path, name: Any, what: str = "file name") -> Path:
    """``folder / name`` if ``name`` is one plain name that stays inside ``folder``; else an :class:`AdapterFileError`.

    Refused: a non-string or empty name, ``.``/``..``, any path separator, a NUL, an absolute path, and a
    name that is a symbolic link resolving outside ``folder``. The message is the same whether or not
    anything exists at the target, so an error never tells what is on the disk.
    """
    folder = Path(folder)
    bad = (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or (os.sep in name)
        or (os.altsep is not None and os.altsep in name)
        or os.path.isabs(name)
    )
    if not bad:
        target = folder / name
        try:
            if target.is_symlink():
                real_folder = folder.resolve()
                bad = target.resolve().parent != real_folder
        except (OSError, RuntimeError):  # a link loop, a name too long
            bad = True
    if bad:
        raise AdapterFileError(
            f"{what} {name!r} is not allowed: it must be one plain name inside the adapter folder {folder} "
            f"(no path separators, no '..', not absolute, not a link out of the folder)"
        )
    return folder / name


# ---- writing ----------------------------------------------------------------------------------------


def _umask_mode() -> int:
    """The mode a plain ``open(..., 'w')`` would give (0o666 & ~umask), as ``save_pretrained`` files get."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_json_file(path: str | Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors_file(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None
) -> None:
    save_file(tensors, str(path), metadata=metadata)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _clean(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _atomic(path: Path, write) -> None:
    """Write ``path`` through a private temporary folder beside it (safetensors' writer makes its own
    temporary file next to its target), then one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".peftlab-tmp-", dir=path.parent)
    try:
        tmp = os.path.join(tmp_dir, path.name)
        write(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_write_json(path: str | Path, data: Any) -> None:
    _atomic(Path(path), lambda tmp: _write_json_file(tmp, data))


def atomic_save_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    clean = _clean(tensors)
    _atomic(Path(path), lambda tmp: _write_safetensors_file(tmp, clean, metadata))


class FolderWriter:
    """An exclusive, journaled writer of one folder (a context manager; see the module doc).

    ``with FolderWriter(folder) as w``: takes ``<folder>/.peftlab.lock``; then the caller tells it which
    files the folder's committed state names (:meth:`recover`, which removes the journaled leftovers of a
    killed save that are not among them), writes files (:meth:`write_json`, :meth:`write_safetensors`:
    staged, then renamed into place), commits (the last rename of the config), and removes the previous
    save's files (:meth:`remove`, only names in ``owned``). On an exception, the files this writer created
    and that nothing committed names are removed again; on a kill, the journal lets the next save do it.

    ``patterns``: the only names the journal may ever remove (regexes of generated names), so a crafted
    lock file cannot make a save delete a user's file.
    """

    def __init__(self, folder: str | Path, patterns: tuple[str, ...] = ()) -> None:
        self.folder = Path(folder)
        self.patterns = [re.compile(p) for p in patterns]
        self.owned: set[str] = set()
        self.created: list[str] = []
        self.retiring: list[str] = []
        self.staging: str | None = None
        self._fd: int | None = None
        self._leftovers: list[str] = []

    # -- lock and journal --
    def __enter__(self) -> FolderWriter:
        if self.folder.exists() and not self.folder.is_dir():
            raise AdapterFileError(f"{self.folder} exists and is not a folder; save into a folder (new or existing)")
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = self.folder / LOCK_NAME
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(lock, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise AdapterFileError(
                    f"{lock} is a symbolic link; peftlab's lock file must be a plain file in the folder it guards. "
                    f"Remove the link and save again"
                ) from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise AdapterFileError(f"{lock} is not a plain file; remove it and save again")
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: no advisory lock
            pass
        self._fd = fd
        try:
            raw = json.loads(os.pread(fd, 1 << 20, 0) or b"{}")
            listed = [*raw.get("created", []), *raw.get("retiring", [])]
            self._leftovers = [n for n in listed if isinstance(n, str)]
            if isinstance(raw.get("staging"), str):
                self._leftovers.append(raw["staging"])
        except (ValueError, AttributeError):
            self._leftovers = []
        return self

    def _journal(self) -> None:
        data = json.dumps(
            {"staging": self.staging, "created": self.created, "retiring": self.retiring}
        ).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def _ours(self, name: str) -> bool:
        return bool(_STAGING.fullmatch(name)) or any(p.fullmatch(name) for p in self.patterns)

    def recover(self, owned: set[str]) -> None:
        """Record the files the committed state names (``owned``) and remove the journaled leftovers of a
        killed save that are not among them.

        The files owned now are journaled as retiring: if this save is killed after its commit but before
        it removed them, the next save finds them no longer named and removes them; if it is killed before
        the commit, they are still named and stay."""
        self.owned = set(owned)
        for name in self._leftovers:
            if name in self.owned or not self._ours(name):
                continue
            try:
                target = plain_name_in(self.folder, name)
            except AdapterFileError:
                continue
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            elif target.is_file() or target.is_symlink():
                target.unlink(missing_ok=True)
        self._leftovers = []
        self.retiring = sorted(n for n in self.owned if self._ours(n))
        self._journal()

    # -- writing --
    def _stage(self) -> Path:
        if self.staging is None:
            self.staging = STAGING_PREFIX + secrets.token_hex(8)
            self._journal()  # journaled before it exists: a kill right after still gets it cleaned
            os.mkdir(self.folder / self.staging, 0o700)
        return self.folder / self.staging

    def _write(self, name: str, write) -> Path:
        target = plain_name_in(self.folder, name)
        if name not in self.owned and name not in self.created:
            self.created.append(name)
            self._journal()
        tmp = self._stage() / name
        write(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, target)
        return target

    def write_json(self, name: str, data: Any) -> Path:
        return self._write(name, lambda tmp: _write_json_file(tmp, data))

    def write_safetensors(
        self, name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None
    ) -> Path:
        clean = _clean(tensors)
        return self._write(name, lambda tmp: _write_safetensors_file(tmp, clean, metadata))

    def remove(self, names) -> None:
        """Remove files of the previous save; only names it owned (see :meth:`recover`) are ever touched."""
        for name in names:
            if name in self.owned:
                with _suppress_missing():
                    plain_name_in(self.folder, name).unlink()

    def commit(self) -> None:
        """Everything written is now named by the committed state: nothing to roll back."""
        self.owned |= set(self.created)
        self.created = []

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:  # roll back what no committed file names
                for name in self.created:
                    if name not in self.owned:
                        with _suppress_missing():
                            (self.folder / name).unlink()
            if self.staging is not None:
                shutil.rmtree(self.folder / self.staging, ignore_errors=True)
            self.staging, self.created = None, []
            if (
                exc_type is None
            ):  # after a failure they stay journaled: the next save decides by what is named
                self.retiring = []
            self._journal()
        finally:
            os.close(self._fd)  # releases the lock
            self._fd = None


class _suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, (FileNotFoundError, IsADirectoryError))


def remove_empty_dir(path: Path) -> None:
    """Remove ``path`` if it holds nothing but our lock file (a folder an older save of ours created)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return
        rest = [p.name for p in path.iterdir()]
        if set(rest) <= {LOCK_NAME}:
            (path / LOCK_NAME).unlink(missing_ok=True)
            path.rmdir()
    except OSError:
        pass


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (set, tuple)):
        return sorted(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


# ---- reading ----------------------------------------------------------------------------------------


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
    """A JSON object from ``path``; missing, invalid JSON or not an object is an :class:`AdapterFileError`."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"config file {path} does not exist (expected {path.name} in {path.parent})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"adapter config {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"adapter config {path} must hold a JSON object, got {type(data).__name__}")
    return data
