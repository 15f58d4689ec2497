r"""AdaLoRA: adaptive budget allocation for LoRA (Zhang et al., 2023, arXiv:2303.10512).

The update of each adapted weight is kept in SVD form::

    h = W x + s · P Λ Q dropout(x),   P: d_out×r (lora_B), Λ = diag(λ) (lora_E, r×1), Q: r×d_in (lora_A)
    s = alpha / init_r

Λ starts at zero (P, Q ~ N(0, 0.02)), so a wrapped model equals the base at init. Triplets
(P_{:,i}, λ_i, Q_{i,:}) are pruned by importance to follow a cubic budget schedule
(:mod:`peftlab.methods.adalora.allocator`); call ``peftlab.adalora_step(model, step)`` once per
step after ``optimizer.step()`` and before ``zero_grad()`` (peftlab's loop and
:class:`peftlab.training.callbacks.PeftlabCallback` do it). The orthogonality regulariser

    R = γ · mean over adapted layers of (‖PᵀP - I‖²_F + ‖QQᵀ - I‖²_F)

is added to ``outputs.loss`` by a forward hook in training mode (use :func:`adalora_orth_loss`
in loops that compute their own loss). The final mask is stored in the config's
``rank_pattern`` and saved with the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.config import PeftConfig, check_int, check_number
from ...core.layer import Slot, layer_dims, weight_shape
from ...core.registry import Injected, Method, register_method
from ...core.state import base_layer_of, get_state, slots_of, submodule
from ...core.structure import is_linear
from ...core.targeting import resolve_targets
from ...util.errors import ConfigError
from ..lora.interop import PEFT_IGNORED, PEFT_PREFIX
from ..lora.slot import LowRankTensors, adapter_tensor_kwargs
from . import estimate
from .allocator import RankAllocator
from .train_state import load_train_state, train_state


@dataclass
class AdaLoraConfig(PeftConfig):
    """AdaLoRA hyper-parameters (names of the paper; HF PEFT's in brackets).

    Args:
        init_r: initial rank of every layer. target_r: average final rank (budget b_T / n_layers).
        alpha: scale numerator [lora_alpha]; the update is scaled by alpha / init_r.
        dropout: dropout on the adapter input.
        t_init, t_final: warm-up steps without pruning, final steps with a fixed mask [tinit, tfinal].
        delta_t: steps between two maskings [deltaT]. beta1, beta2: EMA factors.
        orth_reg_weight: γ. total_steps: T, the number of training steps [total_step].
        rank_pattern: the final mask per layer ({path: [bool]*init_r}); filled in by training.
    """

    method = "adalora"

    init_r: int = 12
    target_r: int = 8
    alpha: float = 32
    dropout: float = 0.0
    t_init: int = 0
    t_final: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_steps: int | None = None
    rank_pattern: dict[str, list[bool]] | None = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("init_r", "target_r", "delta_t"):
            check_int("AdaLoRA", name, getattr(self, name), low=1)
        if self.target_r > self.init_r:
            raise ConfigError(f"AdaLoRA target_r ({self.target_r}) must not exceed init_r ({self.init_r})")
        if self.total_steps is None:
            raise ConfigError(
                "AdaLoRA needs total_steps (the number of training steps) for its budget schedule"
            )
        check_int("AdaLoRA", "total_steps", self.total_steps, low=1)
        check_int("AdaLoRA", "t_init", self.t_init, low=0)
        check_int("AdaLoRA", "t_final", self.t_final, low=0)
        if self.t_init + self.t_final >= self.total_steps:
            raise ConfigError(
                f"inconsistent AdaLoRA schedule: t_init ({self.t_init}) + t_final ({self.t_final}) must be smaller "
                f"than total_steps ({self.total_steps}), leaving steps in which ranks are pruned"
            )
        check_number("AdaLoRA", "beta1", self.beta1, low=0, high=1, high_open=True)
        check_number("AdaLoRA", "beta2", self.beta2, low=0, high=1, high_open=True)
        check_number("AdaLoRA", "alpha", self.alpha, low=0, low_open=True)
        check_number("AdaLoRA", "orth_reg_weight", self.orth_reg_weight, low=0)
        check_number("AdaLoRA", "dropout", self.dropout, low=0, high=1, high_open=True)


class AdaLoraSlot(LowRankTensors, Slot):
    """SVD-form adapter on a frozen linear layer (shapes in the module docstring).

    Tensors: ``lora_A`` (r, d_in) = Q, ``lora_B`` (d_out, r) = P, ``lora_E`` (r, 1) = λ.
    Contribution: ``result + w · s · (D(x) (Q ⊙ λ)ᵀ) Pᵀ``.
    """

    roles = ("lora_A", "lora_B", "lora_E")
    method = "adalora"

    def __init__(self, layer, name: str, r: int, alpha: float, dropout: float) -> None:
        super().__init__(layer, name)
        self.r, self.alpha, self.dropout_p = r, alpha, float(dropout)
        self.scaling = alpha / (r + 1e-5)  # as HF PEFT: alpha / (ranknum + 1e-5), ranknum = init_r
        self.fan_in_fan_out = type(layer.base_layer).__name__ == "Conv1D"

    @staticmethod
    def make_tensors(base_layer: nn.Module, r: int) -> dict[str, nn.Parameter]:
        d_in, d_out = layer_dims(base_layer)
        kw = adapter_tensor_kwargs(base_layer)
        return {
            "lora_A": nn.Parameter(torch.randn(r, d_in, **kw) * 0.02),
            "lora_B": nn.Parameter(torch.randn(d_out, r, **kw) * 0.02),
            "lora_E": nn.Parameter(torch.zeros(r, 1, **kw)),
        }

    @property
    def lora_E(self) -> nn.Parameter:
        return self.layer.lora_E[self.name]

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(Q ⊙ λ (r, d_in), P (d_out, r), s): the contribution is s·(x (Q ⊙ λ)ᵀ) Pᵀ."""
        return self.lora_A * self.lora_E, self.lora_B, self.scaling

    def dropout_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(D(x), 1): ``F.dropout`` as :meth:`contribute` applies it."""
        xin = x.to(self.lora_A.dtype)
        return (F.dropout(xin, self.dropout_p, self.training) if self.dropout_p else xin), 1.0

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ (self.lora_A * self.lora_E).float()) * self.scaling

    def contribute(self, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        xin = F.dropout(x.to(self.lora_A.dtype), self.dropout_p, self.training) if self.dropout_p else x.to(self.lora_A.dtype)
        lora = (xin @ (self.lora_A * self.lora_E).t()) @ self.lora_B.t()
        return (result + lora * (self.scaling * weight)).to(result.dtype)

    def rank(self) -> int:
        return int((self.lora_E != 0).sum())

    def describe(self) -> str:
        return f"init_r={self.r}, rank={self.rank()}"


def adalora_layers(model: nn.Module, adapter_name: str) -> dict[str, AdaLoraSlot]:
    """{path: AdaLoraSlot} of one adapter."""
    return {p: s for p, s in slots_of(model, adapter_name).items() if isinstance(s, AdaLoraSlot)}


def adalora_orth_loss(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """mean over layers of ‖PᵀP - I‖²_F + ‖QQᵀ - I‖²_F (without γ), the paper's Eq. (4).

    HF PEFT (and the authors' code) use the unsquared Frobenius norm averaged per matrix instead, so the
    same ``orth_reg_weight`` regularises more strongly here (≈12× the gradient at init for r=12); the
    measured SST-2 accuracy did not resolve a difference (benchmarks/results/adalora/FINDINGS.md).
    """
    name = get_state(model, adapter_name).config.adapter_name
    total, count = None, 0
    for layer in adalora_layers(model, name).values():
        eye = torch.eye(layer.r, device=layer.lora_A.device, dtype=layer.lora_A.dtype)
        term = ((layer.lora_B.t() @ layer.lora_B - eye) ** 2).sum() + (
            (layer.lora_A @ layer.lora_A.t() - eye) ** 2
        ).sum()
        total = term if total is None else total + term
        count += 1
    return total / count if count else torch.zeros(())


def _orth_hook(adapter_name: str):
    def hook(model, args, output):
        loss = getattr(output, "loss", None)
        if model.training and isinstance(loss, torch.Tensor):
            state = get_state(model, adapter_name)
            running = [
                s for s in adalora_layers(model, adapter_name).values()
                if adapter_name in s.layer.active and adapter_name not in s.layer.disabled
            ]
            if state.config.orth_reg_weight > 0 and running:
                output.loss = loss + state.config.orth_reg_weight * adalora_orth_loss(model, adapter_name)
        return output

    return hook


def inject_adalora(model: nn.Module, config: AdaLoraConfig, txn) -> dict[str, Any]:
    targets = resolve_targets(model, config.target_modules, predicate=is_linear, skip=txn.skip)
    shapes = {}
    for path in targets:
        base = base_layer_of(submodule(model, path))
        shapes[path] = weight_shape(base)
        txn.add_slot(
            path,
            lambda layer: AdaLoraSlot(layer, config.adapter_name, config.init_r, config.alpha, config.dropout),
            AdaLoraSlot.make_tensors(base, config.init_r),
        )
    layers = adalora_layers(model, config.adapter_name)
    allocator = RankAllocator(layers, config)
    if config.rank_pattern:
        unknown = sorted(set(config.rank_pattern) - set(layers))
        if unknown:
            raise ConfigError(
                f"rank_pattern names modules that are not adapted: {unknown[:5]}; adapted modules: {sorted(layers)[:5]}"
            )
        allocator.final_pattern = {k: list(v) for k, v in config.rank_pattern.items()}
    txn.hook(model.register_forward_hook(_orth_hook(config.adapter_name)))
    return Injected(targets=targets, shapes=shapes, live={"allocator": allocator})


def adalora_step(model: nn.Module, step: int, adapter_name: str | None = None) -> None:
    """Update importances and allocate ranks; call after ``optimizer.step()``, before ``zero_grad()``."""
    state = get_state(model, adapter_name)
    _on_step(model, state, step)


def _on_step(model: nn.Module, state, step: int) -> None:
    allocator: RankAllocator = state.live.objects["allocator"]
    if not state.live.objects.get("warned_no_grad") and all(
        s.lora_E.grad is None for s in allocator.layers.values()
    ):
        import warnings

        state.live.objects["warned_no_grad"] = True
        warnings.warn(
            f"AdaLoRA adapter {state.name!r}: on_train_step/adalora_step found no gradients, so importances and "
            f"ranks are not updated; call it after loss.backward() and optimizer.step(), before zero_grad()",
            stacklevel=3,
        )
    pattern = allocator.step(step)
    if pattern is not None and state.config.rank_pattern != pattern:
        state.config.rank_pattern = pattern


def ranks(model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """Current rank (number of non-zero λ) of every AdaLoRA layer."""
    name = get_state(model, adapter_name).config.adapter_name
    return {p: m.rank() for p, m in adalora_layers(model, name).items()}


# ---- HF PEFT interop: keys `base_model.model.<path>.lora_{A,B,E}`; pruned to rank_pattern -------


def to_peft_key(key: str) -> str:
    return PEFT_PREFIX + key


def from_peft_key(key: str) -> str:
    return key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key


def to_peft_config(config: AdaLoraConfig, state) -> dict[str, Any]:
    pattern = config.rank_pattern
    return {
        "peft_type": "ADALORA",
        "task_type": state.info.get("task_type"),
        "r": config.init_r,
        "init_r": config.init_r,
        "target_r": config.target_r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "tinit": config.t_init,
        "tfinal": config.t_final,
        "deltaT": config.delta_t,
        "beta1": config.beta1,
        "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight,
        "total_step": config.total_steps,
        "rank_pattern": {f"{k}.lora_E": v for k, v in pattern.items()} if pattern else None,
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in state.targets}),
        "modules_to_save": config.modules_to_save,
        "bias": "none",
        "inference_mode": True,
        "base_model_name_or_path": state.base_model_name,
    }


#: HF PEFT AdaLoRA fields we read, and those that cannot change what the adapter computes; any other field set
#: to a non-default value is refused by name (see :func:`from_peft_config`)
PEFT_MAPPED = frozenset({
    "init_r", "target_r", "lora_alpha", "lora_dropout", "tinit", "tfinal", "deltaT", "beta1", "beta2",
    "orth_reg_weight", "total_step", "rank_pattern", "target_modules", "modules_to_save",
})  # fmt: skip
PEFT_DEFAULTS = {"bias": "none", "init_lora_weights": True}  # LoRA fields AdaLoRA inherits, unused
PEFT_UNUSED = frozenset({"r"})  # HF PEFT's AdaLoRA starts every layer at init_r whatever r says


def from_peft_config(data: dict[str, Any]) -> AdaLoraConfig:
    unsupported = {
        k: v for k, v in data.items()
        if k not in PEFT_MAPPED | PEFT_IGNORED | PEFT_UNUSED and v not in (None, False, [], {}, "")
        and not (k in PEFT_DEFAULTS and v == PEFT_DEFAULTS[k])
    }  # fmt: skip
    if unsupported:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(unsupported.items()))
        raise ConfigError(
            f"HF PEFT AdaLoRA option(s) not supported by peftlab: {listed}. peftlab implements only "
            f"{', '.join(sorted(PEFT_MAPPED))}; an adapter that needs the others cannot be loaded as AdaLoRA"
        )
    pattern = data.get("rank_pattern")
    if pattern:
        pattern = {k[: -len(".lora_E")] if k.endswith(".lora_E") else k: v for k, v in pattern.items()}
    targets = data.get("target_modules")
    return AdaLoraConfig(
        init_r=data["init_r"],
        target_r=data["target_r"],
        alpha=data.get("lora_alpha", 32),
        dropout=data.get("lora_dropout", 0.0),
        t_init=data.get("tinit", 0),
        t_final=data.get("tfinal", 0),
        delta_t=data.get("deltaT", 1),
        beta1=data.get("beta1", 0.85),
        beta2=data.get("beta2", 0.85),
        orth_reg_weight=data.get("orth_reg_weight", 0.5),
        total_steps=data["total_step"],
        rank_pattern=pattern or None,
        target_modules=sorted(targets) if isinstance(targets, list) else targets,
        modules_to_save=data.get("modules_to_save"),
    )


def prepare_export(model, tensors: dict, state) -> dict:
    """Drop pruned triplets (HF PEFT saves AdaLoRA tensors resized to rank_pattern)."""
    pattern = state.config.rank_pattern
    if not pattern:
        return tensors
    out = dict(tensors)
    for path, keep in pattern.items():
        idx = torch.tensor(keep)
        out[f"{path}.lora_A"] = tensors[f"{path}.lora_A"][idx]
        out[f"{path}.lora_E"] = tensors[f"{path}.lora_E"][idx]
        out[f"{path}.lora_B"] = tensors[f"{path}.lora_B"][:, idx]
    return out


def prepare_import(model, tensors: dict, state) -> dict:
    """Scatter pruned HF PEFT tensors back into init_r slots (pruned λ = 0)."""
    pattern = state.config.rank_pattern
    if not pattern:
        return tensors
    out = dict(tensors)
    for path, keep in pattern.items():
        idx = torch.tensor(keep)
        layer = submodule(model, path).slots[state.name]
        full_a = torch.zeros_like(layer.lora_A, device="cpu")
        full_b = torch.zeros_like(layer.lora_B, device="cpu")
        full_e = torch.zeros_like(layer.lora_E, device="cpu")
        full_a[idx] = tensors[f"{path}.lora_A"].to(full_a.dtype)
        full_b[:, idx] = tensors[f"{path}.lora_B"].to(full_b.dtype)
        full_e[idx] = tensors[f"{path}.lora_E"].to(full_e.dtype)
        out[f"{path}.lora_A"], out[f"{path}.lora_B"], out[f"{path}.lora_E"] = full_a, full_b, full_e
    return out


def examples(adapter_name: str, r: int) -> dict[str, AdaLoraConfig]:
    return {"adalora": AdaLoraConfig(init_r=r, target_r=2, total_steps=10, target_modules="all-linear",
                                     adapter_name=adapter_name)}


register_method(
    Method(
        name="adalora",
        config_class=AdaLoraConfig,
        inject=inject_adalora,
        examples=examples,
        estimate=estimate.RULES,
        unshardable_reason="its rank allocator ranks the importance scores of every layer's full P, Λ and Q matrices "
        "each step and masks Λ in place, which needs unsharded parameters and gradients; train AdaLoRA with "
        "DDP (--distributed ddp), which keeps full replicas",
        train_state=train_state,
        load_train_state=load_train_state,
        on_step=_on_step,
        peft_type="ADALORA",
        to_peft_config=to_peft_config,
        from_peft_config=from_peft_config,
        to_peft_key=to_peft_key,
        from_peft_key=from_peft_key,
        prepare_export=prepare_export,
        prepare_import=prepare_import,
    )
)
