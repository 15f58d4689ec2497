"""A minimal training loop for wrapped (or fully trainable) models.

AdamW on the trainable parameters, linear warm-up then linear decay, gradient clipping, a
per-step ``peftlab.on_train_step`` call (AdaLoRA's rank allocation runs there, after
``optimizer.step()`` and before ``zero_grad``), periodic evaluation that keeps the best dev checkpoint of the trainable
parameters in memory and restores it at the end, and a tqdm bar.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .api import on_train_step
from .memory import make_optimizer


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0
    evals: list[dict] = field(default_factory=list)
    best_step: int | None = None
    best_metric: float | None = None


def default_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's own loss; for causal LMs the fused linear cross-entropy when available."""
    if getattr(getattr(model, "config", None), "is_decoder", False) or hasattr(model, "lm_head"):
        try:
            from .losses import causal_lm_loss
        except ImportError:
            causal_lm_loss = None
        if causal_lm_loss is not None:
            return causal_lm_loss(model, batch)
    return model(**batch).loss


def linear_schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


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
    optimizer: str = "adamw",
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps on ``batches`` (an endless iterator).

    Args:
        evaluate: returns the dev metric (higher is better); with ``eval_every`` the best
            checkpoint of the trainable parameters is kept and restored at the end.
        step_hook: called with the step index right after ``on_train_step`` (e.g. HF PEFT's
            AdaLoRA ``update_and_allocate`` when benchmarking the peer).
        optimizer: one of :data:`peftlab.memory.OPTIMIZERS` ("adamw8bit" etc. need bitsandbytes).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; wrap it with peftlab.wrap or unfreeze it")
    opt = make_optimizer(params, optimizer, lr=lr, weight_decay=weight_decay)
    warmup = int(warmup_ratio * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_schedule(s, steps, warmup))
    result = TrainResult()
    best_state = None
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        batch = next(batches)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        t0 = time.perf_counter()
        loss = loss_fn(model, batch)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        on_train_step(model, step)  # after the update, before zero_grad (AdaLoRA reads the gradients)
        if step_hook is not None:
            step_hook(step)
        sched.step()
        opt.zero_grad(set_to_none=True)
        if device is not None and str(device).startswith("cuda"):
            torch.cuda.synchronize()
        result.step_times.append(time.perf_counter() - t0)
        result.losses.append(loss.item())
        result.tokens += (
            int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        )
        bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
        last = step == steps - 1
        if evaluate is not None and eval_every and ((step + 1) % eval_every == 0 or last):
            metric = evaluate()
            model.train()
            result.evals.append({"step": step + 1, "metric": metric})
            if result.best_metric is None or metric > result.best_metric:
                result.best_metric, result.best_step = metric, step + 1
                best_state = {
                    n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
                }
    result.train_seconds = time.perf_counter() - start
    if best_state is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in best_state:
                    p.copy_(best_state[n].to(p.device))
    model.eval()
    return result


def cycle(make_batches: Callable[[int], Iterator[dict]]) -> Iterator[dict]:
    """Endless batches: ``make_batches(epoch)`` is called again (reshuffled) when one epoch ends."""
    epoch = 0
    while True:
        yield from make_batches(epoch)
        epoch += 1
