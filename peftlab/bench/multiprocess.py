"""Benchmark runs in several processes: launch commands, checks, and the worker's per-process view.

A run whose ``train`` config has ``processes: N > 1`` starts its worker N times:

* on a CPU with ``torchrun --standalone --nproc_per_node N`` (gloo), for both ``distributed: ddp`` and
  ``fsdp`` (accelerate cannot launch several CPU processes without MPI, and its FSDP plugin needs GPUs; our
  training loop applies FSDP2's ``fully_shard`` itself there);
* on GPUs with ``accelerate launch`` (nccl): ``--multi_gpu`` for DDP, ``--use_fsdp --fsdp_version 2`` with
  transformer-block wrapping for FSDP.

``batch_size`` stays the global batch of one optimizer step: each of the N processes gets
``batch_size / (N · grad_accum)`` rows per micro-batch, cut from the same global batches a one-process run
uses, so N-process and one-process runs take the same steps. Evaluation rows are shared out among the
processes and the per-example results gathered (:func:`peftlab.training.loop.evaluate_sharded`). Rank 0 writes the
result record; ``peak_memory_mb`` is the largest process's peak and ``peak_memory_mb_per_process`` all of them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..training.loop import (
    PRECISIONS,
    STRATEGIES,
    check_precision,
    gather_predictions,
    shard_rows,
    split_batches,
)
from ..util.errors import ConfigError


def available(device: str | None) -> tuple[int, str]:
    """(count, what) of the devices processes can use: GPUs on CUDA, else the CPU cores this process may run on."""
    on_gpu = str(device).startswith("cuda") if device else torch.cuda.is_available()
    if on_gpu:
        return torch.cuda.device_count(), "GPUs"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cores = os.cpu_count() or 1
    return cores, "CPU cores"


def check_processes(processes: int, device: str | None = None, distributed: str | None = "ddp") -> None:
    """``processes`` is a positive count no larger than the GPUs (on CUDA) or CPU cores here."""
    if not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"processes must be a positive integer, got {processes!r}")
    if distributed not in (None, *STRATEGIES):
        raise ConfigError(f"distributed must be one of {', '.join(STRATEGIES)}, got {distributed!r}")
    count, what = available(device)
    if processes > count:
        raise ConfigError(
            f"--processes {processes} is more than the {count} {what} on this machine; use at most {count}"
        )


def check_train_config(cfg: dict) -> None:
    """The multi-process and precision keys of a run's ``train`` config (before anything is launched)."""
    check_precision(cfg.get("precision", "fp32"), cfg.get("device"))
    processes, accum = cfg.get("processes", 1), cfg.get("grad_accum", 1)
    check_processes(processes, cfg.get("device"), cfg.get("distributed", "ddp"))
    if not isinstance(accum, int) or accum < 1:
        raise ConfigError(f"grad_accum must be a positive integer, got {accum!r}")
    if cfg.get("batch_size", 1) % (processes * accum):
        raise ConfigError(
            f"batch_size {cfg.get('batch_size')} must be divisible by processes × grad_accum = {processes * accum} "
            "(batch_size is the global batch of one optimizer step)"
        )
    if cfg.get("distributed") == "fsdp" and processes < 2:
        raise ConfigError("distributed: fsdp needs processes >= 2")


def free_port() -> int:
    """A TCP port nobody listens on now (for accelerate launch's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_command(spec: dict, spec_path, result_path) -> list[str]:
    """The command that runs one benchmark worker (one process, torchrun, or accelerate launch)."""
    cfg = spec["train"]
    worker = ["-m", "peftlab.bench.worker", str(spec_path), str(result_path)]
    processes = cfg.get("processes", 1)
    if processes == 1:
        return [sys.executable, *worker]
    device = cfg.get("device")
    on_gpu = str(device).startswith("cuda") if device else torch.cuda.is_available()
    if not on_gpu:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            *worker,
        ]
    mixed = {"fp32": "no"}.get(cfg.get("precision", "fp32"), cfg.get("precision"))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", f"--num_processes={processes}", "--num_machines=1",
        f"--mixed_precision={mixed}", "--dynamo_backend=no", f"--main_process_port={free_port()}",
    ]  # fmt: skip
    if cfg.get("distributed", "ddp") == "fsdp":
        cmd += [
            "--use_fsdp", "--fsdp_version=2", "--fsdp_auto_wrap_policy=TRANSFORMER_BASED_WRAP",
            "--fsdp_reshard_after_forward=true", "--fsdp_state_dict_type=SHARDED_STATE_DICT",
            "--fsdp_cpu_ram_efficient_loading=false",
        ]  # fmt: skip
    else:
        cmd.append("--multi_gpu")
    return [*cmd, *worker]


@dataclass
class ProcessContext:
    """What one worker process of a run needs: the accelerator, its rank, and how to split work."""

    accelerator: Any
    precision: str
    grad_accum: int
    distributed: str | None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> str:
        return str(self.accelerator.device)

    def split(self, batches: Iterator[dict]) -> Iterator[dict]:
        """This process's micro-batches of the global batches."""
        return split_batches(batches, self.world, self.rank, self.grad_accum)

    def evaluate(
        self, task, model, tokenizer, rows: list, batch_size: int, max_length: int, examples=None
    ) -> dict:
        """``task.evaluate`` over all processes: each scores an equal share of ``rows``; the per-example columns
        are gathered (in the order of ``rows``) and the metric computed from them."""
        if self.world == 1:
            return task.evaluate(model, tokenizer, rows, batch_size, max_length, examples=examples)
        columns: dict = {}
        local = shard_rows(rows, self.rank, self.world)
        task.evaluate(model, tokenizer, local, batch_size, max_length, examples=columns)
        full = {
            name: gather_predictions(values, len(rows), self.accelerator) for name, values in columns.items()
        }
        if examples is not None:
            examples.update(full)
        if "correct" in full:
            return {task.metric: sum(full["correct"]) / len(rows)}  # accuracy or exact match
        tp, n_pred, n_ref = sum(full["tp"]), sum(full["n_pred"]), sum(full["n_ref"])
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_ref if n_ref else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1}

    def gather_floats(self, value: float) -> list[float]:
        """``value`` of every process, by rank."""
        if self.world == 1:
            return [value]
        from accelerate.utils import gather_object

        return [float(v) for v in gather_object([value])]

    def train_kwargs(self) -> dict:
        return {
            "precision": self.precision,
            "grad_accum": self.grad_accum,
            "distributed": self.distributed if self.world > 1 else None,
            "accelerator": self.accelerator,
        }


def process_context(cfg: dict, device: str | None) -> ProcessContext:
    """The worker's :class:`ProcessContext` (creates the Accelerator: under torchrun/accelerate launch this
    joins the process group)."""
    from ..training.loop import make_accelerator

    precision = cfg.get("precision", "fp32")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    accum = cfg.get("grad_accum", 1)
    accelerator = make_accelerator(precision, accum, "cpu" if str(device) == "cpu" else None)
    return ProcessContext(accelerator, precision, accum, cfg.get("distributed", "ddp"))
