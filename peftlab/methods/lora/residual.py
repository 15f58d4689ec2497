r"""PiSSA / OLoRA without touching the base: the slot keeps the initial factors A₀, B₀ frozen and computes
``W x + s·(B A − B₀ A₀) x`` as one rank-2r LoRA product, ``A' = [A; A₀]``, ``B' = [B, −B₀]`` (see
:mod:`peftlab.methods.lora.inits`). Exported to HF PEFT as that plain rank-2r LoRA, alpha doubled."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ...backends.lora_ops import lora_delta, lora_forward
from ...core.tensors import adapter_state_dict
from .inits import parse_init
from .slot import LoraSlot


class ResidualInit(nn.Module):
    """The frozen initial factors A₀ (r, d_in) and B₀ (d_out, r) of a PiSSA/OLoRA adapter (buffers)."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", lora_A.detach().clone())
        self.register_buffer("B", lora_B.detach().clone())


class ResidualLoraSlot(LoraSlot):
    """LoRA whose update is ``s·(B A − B₀ A₀)``: PiSSA / OLoRA with the base weight left untouched.

    Tensors: ``lora_A``, ``lora_B`` (trained) and ``lora_residual`` (a :class:`ResidualInit` with the
    frozen A₀, B₀). Forward: LoRA's fused path with ``A' = [A; A₀]`` (2r, d_in) and
    ``B' = [B, −B₀]`` (d_out, 2r); gradients reach A and B only.
    """

    roles = ("lora_A", "lora_B", "lora_residual")
    method = "lora"

    def _stacked(self) -> Any:
        from types import SimpleNamespace

        init = self.layer.lora_residual[self.name]
        a = torch.cat([self.lora_A, init.A.to(self.lora_A.dtype)], 0)
        b = torch.cat([self.lora_B, -init.B.to(self.lora_B.dtype)], 1)
        return SimpleNamespace(
            base_layer=self.base_layer, lora_A=a, lora_B=b, scaling=self.scaling, dropout_p=self.dropout_p,
            training=self.training, use_kernel=self.use_kernel,
        )  # fmt: skip

    def fused_forward(self, x: torch.Tensor, weight: float) -> torch.Tensor | None:
        if weight != 1.0:
            return None

        return lora_forward(self._stacked(), x)

    def contribute(self, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        return (result + lora_delta(self._stacked(), x, self.scaling * weight)).to(result.dtype)

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A' = [A; A₀] (2r, d_in), B' = [B, −B₀] (d_out, 2r), s)."""
        stacked = self._stacked()
        return stacked.lora_A, stacked.lora_B, self.scaling

    def delta_weight(self) -> torch.Tensor:
        """s·(B A − B₀ A₀), (d_out, d_in) fp32."""
        init = self.layer.lora_residual[self.name]
        return (self.lora_B.float() @ self.lora_A.float() - init.B.float() @ init.A.float()) * self.scaling

    def describe(self) -> str:
        return super().describe() + ", residual init"


def residual_export(model: nn.Module, tensors: dict[str, torch.Tensor], state) -> dict[str, torch.Tensor]:
    """Fold ``lora_residual`` (A₀, B₀) into a plain rank-2r LoRA: A' = [A; A₀], B' = [B, −B₀]."""
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".lora_residual.A")]:
        prefix = key[: -len(".lora_residual.A")]
        a0, b0 = out.pop(key), out.pop(f"{prefix}.lora_residual.B")
        out[f"{prefix}.lora_A"] = torch.cat([out[f"{prefix}.lora_A"], a0.to(out[f"{prefix}.lora_A"].dtype)], 0)
        out[f"{prefix}.lora_B"] = torch.cat([out[f"{prefix}.lora_B"], -b0.to(out[f"{prefix}.lora_B"].dtype)], 1)
    return out


def residual_import(model: nn.Module, tensors: dict[str, torch.Tensor], state) -> dict[str, torch.Tensor]:
    """An HF PEFT PiSSA/OLoRA file holds A, B only (its base was residualised on load): take A₀, B₀ from our init."""
    live = adapter_state_dict(model, state.name)
    out = dict(tensors)
    for key, value in live.items():
        if ".lora_residual." in key and key not in out:
            out[key] = value
    return out


def residual_peft_config(config, peft: dict[str, Any]) -> dict[str, Any]:
    """HF PEFT config of the converted rank-2r LoRA (alpha doubled, √2× with rsLoRA; patterns likewise)."""
    if parse_init(config.init)[0] not in ("pissa", "olora"):
        return peft
    factor = math.sqrt(2) if config.use_rslora else 2
    peft = dict(peft)
    peft["r"] = 2 * config.r
    peft["lora_alpha"] = config.alpha * factor
    peft["rank_pattern"] = {k: 2 * v for k, v in config.rank_pattern.items()}
    alphas = {k: v * factor for k, v in config.alpha_pattern.items()}
    for k in config.rank_pattern:  # a pattern rank needs its alpha scaled with it
        alphas.setdefault(k, config.alpha * factor)
    peft["alpha_pattern"] = alphas
    return peft
