r"""peftlab's training loop, on ``accelerate.Accelerator``: one process or many (DDP, FSDP2).

Per optimizer step t, each of the W processes runs ``grad_accum`` = A micro-batches b_{t,w,a} and

    g_t = 1/(W·A) Σ_w Σ_a ∇ L(b_{t,w,a})          (accelerate scales each micro-batch loss by 1/A;
                                                    DDP / FSDP average over the W processes)
    g_t ← g_t · min(1, c / ‖g_t‖₂)                 (clipping on the global norm, c = max_grad_norm)
    θ_{t+1} = AdamW(θ_t, g_t, lr_t)                 (lr_t: linear warm-up, then linear decay)

so with equal micro-batch sizes W processes × batch B/W, one process × A=2 micro-batches of B/2 and one
process × batch B take the same steps (the logged loss is the same global mean). After each optimizer step
(not each micro-batch) :func:`peftlab.on_train_step` runs AdaLoRA's rank allocation (after
``optimizer.step()``, before ``zero_grad``).

Precision: ``fp32``; ``bf16`` (autocast; parameters and optimizer state stay fp32); ``fp16`` (autocast
with a GradScaler, CUDA only). Periodic evaluation keeps the best dev checkpoint of the trainable
parameters in memory and restores it at the end; a tqdm bar shows progress on the main process.

Multi-process: launch with ``torchrun`` or ``accelerate launch``; ``distributed="fsdp"`` shards the model
with FSDP2 (:func:`peftlab.training.fsdp.shard_model` on a CPU; accelerate's FSDP2 plugin when launched with
``accelerate launch --use_fsdp --fsdp_version 2``). Data: each process passes its own micro-batches
(:func:`split_batches` cuts global batches into per-process, per-micro-step slices).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..api import on_train_step
from ..util.errors import ConfigError
from .fsdp import check_shardable, shard_model
from .losses import causal_lm_loss
from .memory import make_optimizer

PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
_ACCELERATE_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class TrainResult:
    """``losses``: the global (all-process) mean loss of each optimizer step; ``tokens``: summed over processes."""

    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0
    evals: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_metric: float | None = None
    grad_norms: list[float] = field(default_factory=list)
    skipped_steps: int = 0


def default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's own loss; for causal LMs the fused linear cross-entropy when available."""
    if getattr(getattr(model, "config", None), "is_decoder", False) or hasattr(model, "lm_head"):
        return causal_lm_loss(model, batch)
    return model(**batch).loss


def linear_schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def check_precision(precision: str, device: str | torch.device | None) -> None:
    """``precision`` is one of :data:`PRECISIONS` and usable on ``device`` (fp16 needs CUDA)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    on_cuda = str(device).startswith("cuda") if device is not None else torch.cuda.is_available()
    if precision == "fp16" and not on_cuda:
        raise ConfigError(
            "precision='fp16' needs a CUDA GPU (fp16 autocast with a GradScaler); on a CPU use precision='bf16'"
        )


def make_accelerator(
    precision: str = "fp32", grad_accum: int = 1, device: str | torch.device | None = None
) -> Any:
    """An ``accelerate.Accelerator`` for ``precision`` and ``grad_accum``; on ``device='cpu'`` a CPU one
    (several processes under torchrun use gloo). accelerate keeps one global state per process, so a
    different precision than the last Accelerator's resets it first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    check_precision(precision, device)
    if grad_accum < 1:
        raise ConfigError(f"grad_accum must be >= 1, got {grad_accum}")
    mixed = _ACCELERATE_PRECISION[precision]
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") not in (
        None,
        mixed,
    ):
        AcceleratorState._reset_state()
    # no CUDA: a CPU accelerator, which joins the process group torchrun launched (gloo); without cpu=True
    # accelerate would see one process per launch and each process would train a model of its own
    cpu = (device is not None and str(device) == "cpu") or (device is None and not torch.cuda.is_available())
    acc = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=grad_accum, cpu=cpu)
    check_world(acc)
    return acc


def check_world(accelerator) -> None:
    """Raise when the launcher started several processes (``WORLD_SIZE``) but ``accelerator`` sees fewer: each
    process would then train a model of its own, silently."""
    try:
        launched = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None
    if launched > 1 and accelerator.num_processes != launched:
        raise ConfigError(
            f"launched as {launched} processes (WORLD_SIZE={launched}) but the accelerator sees "
            f"{accelerator.num_processes}: each process would train a separate model. On a CPU pass device='cpu' "
            f"or accelerator=Accelerator(cpu=True); on GPUs launch with torchrun or accelerate launch"
        )


def split_batches(
    batches: Iterator[dict], processes: int = 1, rank: int = 0, grad_accum: int = 1
) -> Iterator[dict]:
    """This process's micro-batches of global ``batches``: each batch of B rows is cut into
    ``processes × grad_accum`` equal slices of B / (processes·grad_accum) rows; process ``rank`` gets slices
    ``rank·grad_accum … rank·grad_accum + grad_accum - 1``, in the order :func:`train` consumes them.
    """
    parts = processes * grad_accum
    if parts == 1:
        yield from batches
        return
    for batch in batches:
        rows = next(iter(batch.values())).shape[0]
        if rows % parts:
            raise ConfigError(
                f"a batch of {rows} rows can't be split into {parts} equal parts (processes × grad_accum = "
                f"{processes} × {grad_accum}); choose a batch size divisible by {parts}"
            )
        size = rows // parts
        for a in range(grad_accum):
            start = (rank * grad_accum + a) * size
            yield {k: v[start : start + size] for k, v in batch.items()}


def shard_rows(rows: list, rank: int, world: int) -> list:
    """This process's rows for evaluation: every world-th row from ``rank`` of ``rows`` padded (by repeating the
    first rows) to a multiple of ``world``, so that every process runs the same number of batches."""
    padded = rows + rows[: (-len(rows)) % world]
    return padded[rank::world]


def gather_predictions(local: list, n: int, accelerator: Any = None) -> list:
    """Undo :func:`shard_rows`: all processes' predictions for the ``n`` rows, in their original order."""
    if accelerator is None or accelerator.num_processes == 1:
        return local[:n]
    from accelerate.utils import gather_object

    parts = gather_object([local])
    world = len(parts)
    out = [None] * n
    for rank, preds in enumerate(parts):
        for i, pred in enumerate(preds):
            if rank + i * world < n:
                out[rank + i * world] = pred
    return out


def evaluate_sharded(predict: Callable[[list], list], rows: list, accelerator: Any = None) -> list:
    """``predict(rows)`` computed across processes (each an equal share) and gathered on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return predict(rows)
    local = predict(shard_rows(rows, accelerator.process_index, accelerator.num_processes))
    return gather_predictions(local, len(rows), accelerator)


def _prepare(accelerator, model: nn.Module, opt, distributed: str | None, precision: str):
    """(model to call, optimizer): DDP through ``accelerator.prepare``; FSDP2 by accelerate's plugin when it is
    active, else by :func:`peftlab.training.fsdp.shard_model` (CPU / gloo)."""
    from accelerate.utils import DistributedType


    if distributed not in (None, *STRATEGIES):
        raise ConfigError(f"distributed must be one of {', '.join(STRATEGIES)}, got {distributed!r}")
    if distributed == "fsdp" or accelerator.distributed_type == DistributedType.FSDP:
        check_shardable(model)
    if distributed == "fsdp" and accelerator.distributed_type != DistributedType.FSDP:
        if accelerator.num_processes == 1:
            raise ConfigError("distributed='fsdp' needs several processes (torchrun / accelerate launch)")
        model.to(accelerator.device)
        param_dtype = torch.bfloat16 if precision == "bf16" else None
        shard_model(model, param_dtype=param_dtype)  # before the optimizer sees the (now DTensor) parameters
        return model, accelerator.prepare_optimizer(opt(), device_placement=False)
    if accelerator.distributed_type == DistributedType.FSDP:  # FSDP2 plugin: prepare model, then optimizer
        model = accelerator.prepare_model(model)
        return model, accelerator.prepare_optimizer(opt())
    model = accelerator.prepare_model(model)
    return model, accelerator.prepare_optimizer(opt())


def train(
    model: nn.Module,
    batches: Iterator[dict],
    steps: int,
    lr: float,
    warmup_ratio: float = 0.06,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    evaluate: Callable[[], float] | None = None,
    eval_every: int | None = None,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] = default_loss,
    device: torch.device | str | None = None,
    desc: str = "train",
    progress: bool = True,
    step_hook: Callable[[int], None] | None = None,
    optimizer: str | Callable[[list[nn.Parameter]], torch.optim.Optimizer] = "adamw",
    precision: str = "fp32",
    grad_accum: int = 1,
    distributed: str | None = None,
    accelerator: Any = None,
    restore_best: bool = True,
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps on ``batches`` (an endless iterator of this process's
    micro-batches: ``grad_accum`` of them per step).

    Args:
        evaluate: returns the dev metric (higher is better); every process must call it (it may gather,
            see :func:`evaluate_sharded`). With ``eval_every`` the best checkpoint of the trainable parameters
            is kept and restored at the end (``restore_best``).
        step_hook: called with the step index right after ``on_train_step`` (e.g. HF PEFT's
            AdaLoRA ``update_and_allocate`` when benchmarking the peer).
        optimizer: one of :data:`peftlab.training.memory.OPTIMIZERS` ("adamw8bit" etc. need bitsandbytes), or a
            callable ``params -> torch.optim.Optimizer`` (its own lr; the schedule multiplies it).
        precision: fp32 | bf16 | fp16 (fp16 needs CUDA; on a CPU use bf16).
        grad_accum: micro-batches per optimizer step.
        distributed: None (one process, or DDP when launched with several), ``"ddp"`` or ``"fsdp"`` (FSDP2).
        accelerator: an existing ``accelerate.Accelerator`` (default: :func:`make_accelerator`, a CPU one when
            there is no CUDA, so that under ``torchrun`` on a CPU every process joins one process group).

    Under a launcher (``WORLD_SIZE`` > 1) every process must be part of the accelerator's group, else this
    raises :class:`ConfigError` rather than train independent models. The loop writes no file; saving
    (``save_adapter``, ``save_merged``) writes on rank 0 only.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; wrap it with peftlab.wrap or unfreeze it")
    acc = accelerator or make_accelerator(precision, grad_accum, device)
    check_world(acc)
    if acc.gradient_accumulation_steps != grad_accum:
        raise ConfigError(
            f"the accelerator accumulates {acc.gradient_accumulation_steps} micro-batches but grad_accum={grad_accum}"
        )
    module = model  # the user's model (AdaLoRA's hooks and best-checkpoint copies use it)

    def new_optimizer():
        trainable = [p for p in module.parameters() if p.requires_grad]
        if callable(optimizer):
            return optimizer(trainable)
        return make_optimizer(trainable, optimizer, lr=lr, weight_decay=weight_decay)

    model, opt = _prepare(acc, module, new_optimizer, distributed, precision)
    warmup = int(warmup_ratio * steps)
    # not accelerator.prepare'd: accelerate would step it once per process and micro-batch
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lambda s: linear_schedule(s, steps, warmup))
    result = TrainResult()
    best_state = None
    model.train()
    main = acc.is_main_process
    bar = tqdm(range(steps), desc=desc, disable=not (progress and main), leave=False, dynamic_ncols=True)
    on_cuda = acc.device.type == "cuda"
    tokens = 0
    start = time.perf_counter()
    for step in bar:
        t0 = time.perf_counter()
        step_loss = torch.zeros((), device=acc.device)
        for _ in range(grad_accum):
            batch = {k: v.to(acc.device) for k, v in next(batches).items()}
            with acc.accumulate(model):
                with acc.autocast():
                    loss = loss_fn(model, batch)
                acc.backward(loss)
                step_loss += loss.detach().float() / grad_accum
                tokens += (
                    int(batch["attention_mask"].sum())
                    if "attention_mask" in batch
                    else batch["input_ids"].numel()
                )
                if acc.sync_gradients:
                    if max_grad_norm:
                        norm = acc.clip_grad_norm_(
                            [p for p in module.parameters() if p.requires_grad], max_grad_norm
                        )
                        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                        result.grad_norms.append(float(norm))
                    opt.step()
                    if acc.optimizer_step_was_skipped:  # fp16 overflow: no update happened
                        result.skipped_steps += 1
                    else:
                        on_train_step(
                            module, step
                        )  # after the update, before zero_grad (AdaLoRA reads gradients)
                        if step_hook is not None:
                            step_hook(step)
                    sched.step()
                    opt.zero_grad(set_to_none=True)
        if on_cuda:
            torch.cuda.synchronize()
        result.step_times.append(time.perf_counter() - t0)
        result.losses.append(acc.reduce(step_loss, reduction="mean").item())
        bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
        last = step == steps - 1
        if evaluate is not None and eval_every and ((step + 1) % eval_every == 0 or last):
            metric = evaluate()
            model.train()
            result.evals.append({"step": step + 1, "metric": metric})
            if result.best_metric is None or metric > result.best_metric:
                result.best_metric, result.best_step = metric, step + 1
                best_state = {
                    n: p.detach().to("cpu", copy=True)
                    for n, p in module.named_parameters()
                    if p.requires_grad
                }
    result.train_seconds = time.perf_counter() - start
    result.tokens = int(acc.reduce(torch.tensor(tokens, device=acc.device), reduction="sum").item())
    if best_state is not None and restore_best:
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n].to(p.device))
    model.eval()
    if accelerator is None:
        acc.free_memory()  # drop accelerate's references to the prepared model and optimizer
    return result


def cycle(make_batches: Callable[[int], Iterator[dict]]) -> Iterator[dict]:
    """Endless batches: ``make_batches(epoch)`` is called again (reshuffled) when one epoch ends."""
    epoch = 0
    while True:
        yield from make_batches(epoch)
        epoch += 1


def local_rank_device(device: str | None = None) -> str:
    """The device of this process: ``cuda:<LOCAL_RANK>`` on GPUs, else ``cpu`` (or ``device`` when given)."""
    if device:
        return device
    if torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    return "cpu"


__all__ = [
    "PRECISIONS",
    "STRATEGIES",
    "TrainResult",
    "train",
    "cycle",
    "split_batches",
    "shard_rows",
    "gather_predictions",
    "evaluate_sharded",
    "make_accelerator",
    "check_world",
    "check_precision",
    "default_loss",
    "linear_schedule",
    "local_rank_device",
]
