r"""Train many adapters in one pass over one frozen base: :func:`train_many`.

Each :class:`TrainJob` is an adapter config, its data (one batch of its own rows per step), its
:class:`Recipe` and its seed. Per step, the batches of the jobs still running are stacked into one
mixed batch (``model(**batch, adapter_names=...)``, :mod:`peftlab.serving.train_rows`), so the frozen base
runs once for every job; each job's loss is computed on its own rows and

    L = Σ_j L_j(rows of j)     ⇒     ∇_{θ_j} L = ∇_{θ_j} L_j        (θ_j only sees its own rows)

One optimizer per optimizer kind (normally one) holds one parameter group per job, with the job's learning
rate (its own schedule: lr_j · f_j(t_j), t_j the job's own step), weight decay and betas / momentum; each
group is clipped on its own norm (g_j ← g_j · min(1, c_j / ‖g_j‖₂)). Every random draw a job makes (its
adapter's initialisation and its dropout) comes from its own generator seeded with its seed
(:func:`peftlab.serving.hooks.set_row_streams`). A job that reaches its step count leaves the pack: its
tensors are frozen, its group leaves the optimizer, its adapter is saved; the other jobs go on unchanged.

So each job's losses, gradient norms and weights equal those of ``train_many(model, [job])``, the job run
alone (tests/training/test_train_many.py). Dropout inside the base model is off by default
(``base_dropout=False``); with ``base_dropout=True`` it draws per job segment from each job's stream
(:func:`peftlab.serving.base_rows.base_dropout_rows`), as the job draws alone. Excluded: losses that a method adds to the model's own ``output.loss`` (AdaLoRA's orthogonal regulariser;
the jobs' losses are computed from the logits).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..api import wrap
from ..core.activation import set_trainable
from ..core.registry import get_method
from ..core.state import adapter_layers, adapters, get_state
from ..core.tensors import adapter_tensors
from ..persist.format import save_adapter
from ..serving.base_rows import base_dropout_rows
from ..serving.hooks import set_row_streams
from ..serving.train_rows import on_stream
from ..util.errors import ConfigError

SCHEDULES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class Recipe:
    """How one job trains.

    Args:
        lr: peak learning rate; steps: optimizer steps; warmup_steps: linear warm-up steps.
        schedule: after warm-up, "linear" (to 0 at ``steps``), "cosine" (to 0) or "constant".
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        max_grad_norm: clip the job's own gradient norm to this (None: no clipping).
        optimizer: "adamw" or "sgd"; betas (AdamW), momentum (SGD).
    """

    lr: float = 1e-4
    steps: int = 100
    warmup_steps: int = 0
    schedule: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.0

    def check(self, job: str) -> None:
        def bad(what: str, valid: str) -> ConfigError:
            return ConfigError(f"job {job!r}: recipe {what}; valid: {valid}")

        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise bad(f"lr={self.lr!r}", "a positive finite number")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise bad(f"steps={self.steps!r}", "an integer >= 1")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.steps:
            raise bad(f"warmup_steps={self.warmup_steps!r}", f"an integer in [0, steps={self.steps}]")
        if self.schedule not in SCHEDULES:
            raise bad(f"schedule={self.schedule!r}", ", ".join(SCHEDULES))
        if self.optimizer not in OPTIMIZERS:
            raise bad(f"optimizer={self.optimizer!r}", ", ".join(OPTIMIZERS))
        if self.weight_decay < 0:
            raise bad(f"weight_decay={self.weight_decay!r}", "a number >= 0")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise bad(f"max_grad_norm={self.max_grad_norm!r}", "a positive number or None")

    def factor(self, step: int) -> float:
        """lr_t / lr at the job's step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        done = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        if self.schedule == "linear":
            return max(0.0, 1.0 - done)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


@dataclass
class TrainJob:
    """One adapter to train: ``config`` (its ``adapter_name`` names the job), ``data`` (an iterable of batches
    of this job's rows, one per step: dicts of tensors with ``labels``), ``recipe``, ``seed``.

    ``loss``: ``(logits of the job's rows, its batch) -> scalar`` (default :func:`default_job_loss`);
    ``save_dir``: where its adapter is saved when it finishes (None: not saved).
    ``initial``: the adapter's starting tensors ({path: tensor} as :func:`peftlab.core.tensors.adapter_tensors`
    names them), e.g. those of the job's separate run; ``rng_state``: its stream's state when training starts
    (``torch.get_rng_state()`` of the separate run there). Default: both drawn from ``seed``.
    """

    config: Any
    data: Iterable[dict]
    recipe: Recipe = field(default_factory=Recipe)
    seed: int = 0
    loss: Callable[[torch.Tensor, dict], torch.Tensor] | None = None
    save_dir: str | Path | None = None
    initial: dict[str, torch.Tensor] | None = None
    rng_state: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return self.config.adapter_name


@dataclass
class JobResult:
    """What one job did: per step its loss, gradient norm (before clipping) and learning rate; its saved adapter."""

    name: str
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    steps: int = 0
    finished_at: int | None = None  # the pack step at which it left
    saved: Path | None = None
    seconds: float = 0.0


def default_job_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Cross-entropy: next-token (labels (B, T), shifted, -100 ignored) or per row (labels (B,))."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


_PAD = {"labels": -100}


def stack_rows(batches: list[dict]) -> tuple[dict, list[torch.Tensor]]:
    """One batch of every job's rows (right-padded to the longest sequence: input ids and type ids with 0, the
    attention mask with 0, token labels with -100) and each job's row indices in it."""
    keys = set(batches[0])
    for b in batches[1:]:
        if set(b) != keys:
            raise ConfigError(f"jobs' batches must have the same keys to share a pass, got {sorted(keys)} and {sorted(b)}")
    lengths = {b["input_ids"].shape[1] for b in batches if "input_ids" in b and b["input_ids"].dim() == 2}
    if len(lengths) > 1 and "attention_mask" not in keys:
        raise ConfigError("jobs' batches have different sequence lengths but no attention_mask to pad them with")
    width = max(lengths, default=0)
    out = {}
    for key in keys:
        parts = []
        for b in batches:
            t = b[key]
            if t.dim() == 2 and t.shape[1] < width:
                t = F.pad(t, (0, width - t.shape[1]), value=_PAD.get(key, 0))
            parts.append(t)
        out[key] = torch.cat(parts)
    starts = [0]
    for b in batches:
        starts.append(starts[-1] + len(next(iter(b.values()))))
    rows = [torch.arange(starts[i], starts[i + 1]) for i in range(len(batches))]
    return out, rows


def _own_rows(logits: torch.Tensor, rows: torch.Tensor, batch: dict) -> torch.Tensor:
    """A job's logits: its rows, cut back to its own sequence length (the pack right-pads)."""
    out = logits.index_select(0, rows.to(logits.device))
    ids = batch.get("input_ids")
    if ids is not None and ids.dim() == 2 and out.dim() >= 3 and out.shape[1] > ids.shape[1]:
        out = out[:, : ids.shape[1]]
    return out


def _train_modes(model: nn.Module, base_dropout: bool) -> None:
    if base_dropout:
        model.train()
        return
    model.eval()  # the base's own dropout off: it would draw over the whole pack's batch
    for _, layer in adapter_layers(model):
        layer.train()


def _add_jobs(model: nn.Module, jobs: list[TrainJob]) -> dict[str, torch.Generator]:
    names = [job.name for job in jobs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"train_many: job names (the configs' adapter_name) must differ; repeated: {dupes}")
    loaded = sorted(set(names) & set(adapters(model)))
    if loaded:
        raise ConfigError(f"train_many: the model already has adapter(s) {loaded}; give the jobs other adapter_names")
    for job in jobs:
        job.recipe.check(job.name)
    streams = {}
    for job in jobs:  # each adapter initialised from its own stream, as it would be alone
        gen = streams[job.name] = torch.Generator().manual_seed(job.seed)
        with on_stream(gen):
            wrap(model, job.config)
        if job.initial is not None:
            _load_initial(model, job)
        if job.rng_state is not None:
            gen.set_state(job.rng_state)
    return streams


def _load_initial(model: nn.Module, job: TrainJob) -> None:
    live = adapter_tensors(model, job.name)
    missing, extra = sorted(set(live) - set(job.initial)), sorted(set(job.initial) - set(live))
    if missing or extra:
        raise ConfigError(f"job {job.name!r}: initial tensors do not match its adapter (missing {missing[:3]}, "
                          f"unknown {extra[:3]})")
    with torch.no_grad():
        for key, t in live.items():
            src = job.initial[key]
            if src.shape != t.shape:
                raise ConfigError(f"job {job.name!r}: initial {key} has shape {tuple(src.shape)}, the adapter's is {tuple(t.shape)}")
            t.copy_(src)


def _optimizers(model: nn.Module, jobs: list[TrainJob]) -> tuple[list[torch.optim.Optimizer], dict[str, dict]]:
    groups: dict[str, list[dict]] = {}
    for job in jobs:
        r = job.recipe
        params = [t for t in adapter_tensors(model, job.name).values() if isinstance(t, nn.Parameter) and t.requires_grad]
        group = {"params": params, "lr": r.lr, "weight_decay": r.weight_decay, "job": job.name}
        group.update({"betas": r.betas} if r.optimizer == "adamw" else {"momentum": r.momentum})
        groups.setdefault(r.optimizer, []).append(group)
    opts = [torch.optim.AdamW(g) if kind == "adamw" else torch.optim.SGD(g) for kind, g in groups.items()]
    by_job = {g["job"]: g for opt in opts for g in opt.param_groups}
    return opts, by_job


def train_many(
    model: nn.Module,
    jobs: list[TrainJob],
    base_dropout: bool = False,
    on_step: Callable[[int, dict[str, JobResult]], None] | None = None,
    jobs_per_pass: int | None = None,
) -> dict[str, JobResult]:
    """Add one adapter per job to ``model`` and train them all at once (module docstring); {name: JobResult}.

    ``on_step(pack_step, results)`` runs after every step (progress, evaluation). Each finished job's adapter
    is saved to its ``save_dir`` (when given) as it leaves the pack. The adapters stay on the model.
    ``jobs_per_pass`` (default: every running job) splits a step's forward and backward into passes over at
    most that many jobs' rows, then steps every job once: the same gradients (a job's rows are all in one
    pass) with the activations of fewer rows held at a time.

    Raises:
        ConfigError: repeated or already loaded job names, a bad recipe, batches that cannot share a pass, a
            job whose data ran out before its steps, or ``jobs_per_pass`` below 1.
    """
    jobs = list(jobs)
    if not jobs:
        raise ConfigError("train_many needs at least one TrainJob")
    if jobs_per_pass is not None and (
        isinstance(jobs_per_pass, bool) or not isinstance(jobs_per_pass, int) or jobs_per_pass < 1
    ):
        raise ConfigError(f"jobs_per_pass must be an integer ≥ 1 (or None: every job in one pass), got {jobs_per_pass!r}")
    streams = _add_jobs(model, jobs)
    set_trainable(model, list(streams))
    set_row_streams(model, streams)
    _train_modes(model, base_dropout)
    opts, groups = _optimizers(model, jobs)
    results = {job.name: JobResult(job.name) for job in jobs}
    data = {job.name: iter(job.data) for job in jobs}
    running = list(jobs)
    pack_step = 0
    try:
        while running:
            start = time.perf_counter()
            batches = []
            for job in running:
                try:
                    batches.append(next(data[job.name]))
                except StopIteration:
                    raise ConfigError(
                        f"job {job.name!r}: its data ran out after {results[job.name].steps} batches; "
                        f"it needs {job.recipe.steps} (one per step)"
                    ) from None
            device = next(p for g in groups.values() for p in g["params"]).device
            width = jobs_per_pass or len(running)
            _train_modes(model, base_dropout)  # on_step may have evaluated
            losses = []
            for at in range(0, len(running), width):
                losses += _forward_backward(
                    model, running[at : at + width], batches[at : at + width], streams, base_dropout, device
                )
            for job, loss in zip(running, losses):
                res, group, r = results[job.name], groups[job.name], job.recipe
                group["lr"] = r.lr * r.factor(res.steps)
                params = [p for p in group["params"] if p.grad is not None]
                norm = torch.nn.utils.clip_grad_norm_(params, r.max_grad_norm if r.max_grad_norm else float("inf"))
                res.losses.append(loss.item())
                res.grad_norms.append(float(norm))
                res.lrs.append(group["lr"])
            for opt in opts:
                opt.step()
            for job in running:  # per-step method hooks (AdaLoRA's allocator), on the job's own step count
                state = get_state(model, job.name)
                hook = get_method(state.config.method).on_step
                if hook is not None:
                    hook(model, state, results[job.name].steps)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            pack_step += 1
            elapsed = time.perf_counter() - start
            for job in list(running):
                res = results[job.name]
                res.steps += 1
                res.seconds += elapsed
                if res.steps >= job.recipe.steps:
                    _finish(model, job, res, opts, groups, pack_step)
                    running.remove(job)
            if on_step is not None:
                on_step(pack_step, results)
    finally:
        set_row_streams(model, None)
    return results


def _forward_backward(
    model: nn.Module, jobs: list[TrainJob], batches: list[dict], streams: dict, base_dropout: bool, device
) -> list[torch.Tensor]:
    """One pass over the stacked rows of ``jobs``: forward with per-row adapters, Σ_j L_j backward; [L_j]."""
    batch, rows = stack_rows(batches)
    names = [job.name for job, r in zip(jobs, rows) for _ in range(len(r))]
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    widths = {job.name: b["input_ids"].shape[1] for job, b in zip(jobs, batches)
              if b.get("input_ids") is not None and b["input_ids"].dim() == 2}  # fmt: skip
    set_row_streams(model, streams, widths)
    if base_dropout:  # the base's own dropout per job segment, on the job's stream
        segments = [(r, streams[job.name], widths.get(job.name)) for job, r in zip(jobs, rows)]
        with base_dropout_rows(model, segments):
            logits = model(**inputs, adapter_names=names).logits
    else:
        logits = model(**inputs, adapter_names=names).logits
    losses = [(job.loss or default_job_loss)(_own_rows(logits, r, b), {k: v.to(device) for k, v in b.items()})
              for job, r, b in zip(jobs, rows, batches)]  # fmt: skip
    torch.stack([loss.float() for loss in losses]).sum().backward()
    return losses


def _finish(model, job: TrainJob, res: JobResult, opts, groups, pack_step: int) -> None:
    """The job leaves the pack: its tensors freeze, its group leaves its optimizer, its adapter is saved."""
    group = groups.pop(job.name)
    for opt in opts:
        opt.param_groups[:] = [g for g in opt.param_groups if g is not group]
        for p in group["params"]:
            opt.state.pop(p, None)
    for p in group["params"]:
        p.requires_grad_(False)
    res.finished_at = pack_step
    if job.save_dir is not None:
        res.saved = save_adapter(model, job.save_dir, adapter_name=job.name)


__all__ = ["JobResult", "Recipe", "TrainJob", "default_job_loss", "stack_rows", "train_many"]
