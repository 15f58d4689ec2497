"""Resumable training state for :func:`peftlab.finetune.finetune`: ``OUT/checkpoint/``.

A checkpoint after global step k (1-based count of finished optimizer steps) holds

* ``trainable-<k>.safetensors``: every trainable parameter (name -> tensor);
* ``optimizer-<k>.safetensors``: AdamW's per-parameter state, keys ``<param index>.<exp_avg|exp_avg_sq|step>``;
* ``rng-<k>.safetensors``: the torch CPU (and CUDA) generator states;
* ``state.json``: the step, those three file names, the optimizer's hyper-parameters and the run's
  fingerprint (the settings that must match to resume). It is written last and atomically: it is the
  commit point, so a crash leaves the previous complete checkpoint. Then the files of the previous
  checkpoint (named in its state.json) are removed; nothing else in the folder is touched. When the run
  finishes, the checkpoint is removed the same way (:meth:`Checkpointer.remove`).

Resuming at step k of N restores parameters, optimizer moments and RNG, skips the first k batches, and
continues the same linear schedule: checkpoints are taken only after warm-up (k ≥ W), where
lr(t) = lr · (N - t) / (N - W), so a fresh schedule of N - k steps with no warm-up and base lr
lr · (N - k) / (N - W) gives the same learning rates.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .util.errors import ConfigError

STATE = "state.json"


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # the mode a plain open() gives, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, data) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")

    atomic_write(Path(path), write)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(clean, tmp, metadata={"format": "pt"}))


class Checkpointer:
    """Saves and restores the training state of one run in ``folder`` (module docstring)."""

    def __init__(self, folder: Path, model: torch.nn.Module, fingerprint: dict):
        self.folder = Path(folder)
        self.model = model
        self.fingerprint = fingerprint
        self.optimizer: torch.optim.Optimizer | None = None

    # ---- reading ----

    def read(self) -> dict | None:
        """The last committed checkpoint's state.json, or None; a different run's is a ConfigError."""
        path = self.folder / STATE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path} is unreadable ({exc}); remove the checkpoint folder to start over") from None
        theirs = state.get("fingerprint", {})
        differ = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
        if differ:
            raise ConfigError(
                f"{self.folder} holds a checkpoint (step {state.get('step')}) of a different run (differs in: "
                f"{', '.join(differ)}); use another --out, or remove {self.folder} to start over"
            )
        return state

    def restore(self, state: dict) -> None:
        """Load the trainable parameters and RNG states of ``state`` (the optimizer: :meth:`optimizer_factory`)."""
        tensors = load_file(str(self.folder / state["files"]["trainable"]))
        params = dict(self.model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
        if missing:
            raise ConfigError(f"{self.folder}: checkpoint lacks trainable parameters {missing[:3]}; remove it to start over")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].device))
        rng = load_file(str(self.folder / state["files"]["rng"]))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

    def optimizer_factory(self, make, lr: float, state: dict | None):
        """A ``params -> optimizer`` callable for :func:`peftlab.training.loop.train`: ``make(params, lr)`` with the saved
        moments of ``state`` loaded and its base lr set to ``lr``; the optimizer is kept for saving."""

        def build(params):
            opt = make(params, lr)
            if state is not None:
                flat = load_file(str(self.folder / state["files"]["optimizer"]))
                per_param: dict[int, dict] = {}
                for key, value in flat.items():
                    index, _, name = key.partition(".")
                    per_param.setdefault(int(index), {})[name] = value
                groups = [dict(g, lr=lr, initial_lr=lr) for g in state["param_groups"]]
                for g in groups:
                    if "betas" in g:
                        g["betas"] = tuple(g["betas"])
                opt.load_state_dict({"state": per_param, "param_groups": groups})
            self.optimizer = opt
            return opt

        return build

    # ---- writing ----

    def save(self, step: int) -> None:
        """Commit the state after ``step`` finished optimizer steps; then remove the previous checkpoint's files."""
        if self.optimizer is None:
            return
        previous = (self.folder / STATE).is_file() and json.loads((self.folder / STATE).read_text())
        files = {k: f"{k}-{step:07d}.safetensors" for k in ("trainable", "optimizer", "rng")}
        write_tensors(
            self.folder / files["trainable"], {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        )
        sd = self.optimizer.state_dict()
        flat = {f"{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items() if torch.is_tensor(v)}
        write_tensors(self.folder / files["optimizer"], flat)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        write_tensors(self.folder / files["rng"], rng)
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in sd["param_groups"]]
        write_json(
            self.folder / STATE,
            {"step": step, "files": files, "param_groups": groups, "fingerprint": self.fingerprint},
        )
        if previous:
            for name in previous.get("files", {}).values():
                if name not in files.values() and "/" not in name and (self.folder / name).is_file():
                    (self.folder / name).unlink()


    def remove(self) -> None:
        """Delete the committed checkpoint (the files its state.json names, then state.json and the folder if
        empty): called when the run finished, so a rerun starts over instead of resuming a stale state."""
        path = self.folder / STATE
        if not path.is_file():
            return
        state = json.loads(path.read_text())
        for name in state.get("files", {}).values():
            if "/" not in name and (self.folder / name).is_file():
                (self.folder / name).unlink()
        path.unlink()
        try:
            self.folder.rmdir()
        except OSError:  # something else is in the folder: leave it
            pass


def resumed_lr(lr: float, step: int, total: int, warmup: int) -> float:
    """The base lr of a resumed session at ``step`` ≥ ``warmup`` of ``total`` (module docstring)."""
    return lr * (total - step) / max(1, total - warmup)


__all__ = ["Checkpointer", "resumed_lr", "atomic_write", "write_json", "write_tensors"]
