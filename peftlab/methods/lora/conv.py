r"""LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (HF PEFT's ``lora.Conv1d/2d/3d``), and DoRA on them.

A convolution with weight W (C_out, C_in/g, *k) and g groups gets a down-convolution A with the base's kernel,
stride, padding, dilation and padding mode (C_in → r channels, no groups) and a 1×1 up-convolution B
(r → C_out, with the base's groups)::

    h = conv(x; W) + b + s · conv₁ₓ₁(conv(D(x); A); B)      A (r, C_in, *k) Kaiming,  B (C_out, r/g, *1) = 0

so a fresh adapter computes the base model. With g = 1 the composition is one convolution of weight
ΔW = s · B A (the (C_out, r) × (r, C_in·∏k) product, reshaped to W's shape): merging adds it to W exactly.
With g > 1 A mixes every input channel, so ΔW is not a grouped weight and the adapter cannot be merged (HF PEFT
refuses too); r must then be a multiple of g (B's groups), as in HF PEFT.

DoRA (Liu et al., 2024, eq. 5) with the norm taken per output channel over (C_in, *k), m (1, C_out, 1, ...) as
HF PEFT stores it::

    W' = m ⊙ (W + ΔW) / n,   n = ‖W + ΔW‖ (detached);   y = (m/n) ⊙ (conv(x; W) + s·LoRA(x)) + b

The tensors have HF PEFT's shapes (``lora_A.weight``, ``lora_B.weight`` of its conv modules, and the magnitude),
so export and import are plain key renames.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ...core.layer import Slot
from ...util.errors import ConfigError, MergeError
from .dora import DoraMerge
from .inits import parse_init
from .slot import LoraSlot, adapter_tensor_kwargs

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def is_conv(module: nn.Module) -> bool:
    """An ``nn.Conv1d/2d/3d`` (not a transposed convolution, not GPT-2's ``Conv1D``, which is a linear layer)."""
    return isinstance(module, CONV_TYPES)


def conv(base: nn.Module, x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``base``'s convolution (stride, padding, dilation, padding mode) of ``x`` with ``weight``, no bias."""
    fn = _CONV_FN[weight.dim() - 2]
    if base.padding_mode != "zeros":
        x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        return fn(x, weight, None, base.stride, 0, base.dilation, groups)
    return fn(x, weight, None, base.stride, base.padding, base.dilation, groups)


def up(h: torch.Tensor, lora_b: torch.Tensor, groups: int) -> torch.Tensor:
    """The 1×1 convolution B (C_out, r/g, *1) of ``h`` (N, r, ...)."""
    return _CONV_FN[lora_b.dim() - 2](h, lora_b, None, 1, 0, 1, groups)


class ConvLoraSlot(LoraSlot):
    """LoRA on a convolution: ``lora_A`` (r, C_in, *k) Kaiming-uniform, ``lora_B`` (C_out, r/g, *1) zero;
    ΔW = s·B A of W's shape (module docstring). Same constructor as :class:`LoraSlot`."""

    combinable = False  # ΔW has the kernel's shape: combine rebuilds (d_out, d_in) LoRAs only

    def __init__(self, layer, name: str, r: int, alpha: float, scaling: float, dropout: float = 0.0,
                 use_kernel: str = "auto") -> None:  # fmt: skip
        Slot.__init__(self, layer, name)
        base = layer.base_layer
        self.in_features, self.out_features = base.in_channels, base.out_channels
        self.r, self.alpha, self.scaling = r, alpha, scaling
        self.dropout_p = float(dropout)
        self.use_kernel = use_kernel
        self.fan_in_fan_out = False

    @staticmethod
    def make_tensors(base_layer: nn.Module, r: int) -> dict[str, nn.Parameter]:
        kw = adapter_tensor_kwargs(base_layer)
        kernel = tuple(base_layer.weight.shape[2:])
        lora_a = nn.Parameter(torch.empty(r, base_layer.in_channels, *kernel, **kw))
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))  # as HF PEFT resets its lora_A conv
        lora_b = torch.zeros(base_layer.out_channels, r // base_layer.groups, *(1,) * len(kernel), **kw)
        return {"lora_A": lora_a, "lora_B": nn.Parameter(lora_b)}

    def low_rank_factors(self) -> None:
        return None  # a convolution, not x Aᵀ Bᵀ: mixed batches run it per segment of rows

    def fused_forward(self, x: torch.Tensor, weight: float) -> None:
        return None

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """conv₁ₓ₁(conv(D(x); A); B), unscaled (N, C_out, ...)."""
        x = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
        return up(conv(self.base_layer, x.to(self.lora_A.dtype), self.lora_A), self.lora_B, self.base_layer.groups)

    def contribute(self, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        return result + (self.lora_out(x) * (self.scaling * weight)).to(result.dtype)

    def ba(self) -> torch.Tensor:
        """B A of W's shape (C_out, C_in, *k) in fp32 (unscaled; g = 1)."""
        a, b = self.lora_A.float(), self.lora_B.float()
        return (b.flatten(1) @ a.flatten(1)).view(self.base_layer.weight.shape)

    def product(self) -> torch.Tensor:
        """:meth:`ba` for a merge: refused on a grouped or a parametrized (``weight_norm``) base.

        Raises:
            MergeError: groups > 1, or the base's weight is computed by a parametrization (Wav2Vec2's positional
                convolution), where a write into ``weight`` would be lost.
        """
        base, groups = self.base_layer, self.base_layer.groups
        if parametrize.is_parametrized(base, "weight"):
            raise MergeError(
                f"adapter {self.name!r} on a {type(base).__name__} cannot be merged: its weight is computed by a "
                f"parametrization (e.g. weight_norm), so a merged weight would not be kept. Keep the adapter unmerged, "
                f"or remove the parametrization first (torch.nn.utils.parametrize.remove_parametrizations)"
            )
        if groups > 1:
            raise MergeError(
                f"adapter {self.name!r} on a {type(self.base_layer).__name__} with groups={groups} cannot be merged: its "
                f"down-projection A reads every input channel, so B A is not a grouped weight (HF PEFT refuses this "
                f"merge too). Keep the adapter unmerged (unwrap(model, merge=False) keeps it out of the weights)"
            )
        return self.ba()

    def delta_weight(self) -> torch.Tensor:
        """s · B A, shape (C_out, C_in, *k), fp32."""
        return self.product() * self.scaling

    def describe(self) -> str:
        return super().describe() + f", conv groups={self.base_layer.groups}"


class ConvDoraSlot(DoraMerge, ConvLoraSlot):
    """DoRA on a convolution: a :class:`ConvLoraSlot` plus ``lora_magnitude`` (1, C_out, 1, ...) (HF PEFT's
    ``lora_magnitude_vector`` of a conv). The norm n is a constant in backward (paper §4.3)."""

    roles = ("lora_A", "lora_B", "lora_magnitude")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._merge_norm: torch.Tensor | None = None  # n at the last merge (for unmerge)

    @staticmethod
    @torch.no_grad()
    def make_magnitude(base_layer: nn.Module) -> nn.Parameter:
        """m = ‖W‖ per output channel, (1, C_out, 1, ...): with B = 0 the output is the base's."""
        weight = base_layer.weight
        kw = adapter_tensor_kwargs(base_layer)
        shape = (1, weight.shape[0]) + (1,) * (weight.dim() - 2)
        if weight.device.type == "meta":
            return nn.Parameter(torch.empty(shape, device="meta", dtype=kw["dtype"]))
        return nn.Parameter(torch.linalg.vector_norm(weight.float().flatten(1), dim=1).view(shape).to(kw["dtype"]))

    @property
    def magnitude(self) -> nn.Parameter:
        return self.layer.lora_magnitude[self.name]

    def _norm(self, weight_matrix: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm((weight_matrix + lora).flatten(1), dim=1)

    def contribute(self, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        """result + w·(W' x − W x): (m/n − 1)·conv(x; W) + (m/n)·s·LoRA(x)."""
        base = self.base_layer
        with torch.no_grad():
            norm = self._norm(base.weight.float(), self.ba() * self.scaling).view(self.magnitude.shape)
        scale = self.magnitude / norm
        drop = self.dropout_p > 0 and self.training
        xd = F.dropout(x, self.dropout_p, True) if drop else x  # HF PEFT: the base term reads the dropped x too
        base_out = conv(base, xd.to(base.weight.dtype), base.weight.detach(), base.groups).to(scale.dtype)
        lora = up(conv(base, xd.to(self.lora_A.dtype), self.lora_A), self.lora_B, base.groups)
        out = (scale - 1.0) * base_out + scale * lora * self.scaling
        return result + (weight * out).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """W' − W for the current base W, fp32."""
        weight = self.base_layer.weight.float()
        return self._merge(weight, 1.0)[0] - weight

    def scaled_product64(self, device: torch.device) -> torch.Tensor:
        """s·ΔW_conv in fp64, the kernel-shaped product of B and A (:meth:`product`)."""
        return self.product().double().to(device) * self.scaling

    def describe(self) -> str:
        return super().describe() + ", dora"


def conv_slot(base: nn.Module, r: int, config, path: str) -> tuple[dict[str, nn.Parameter], type]:
    """The fresh tensors and the slot class of a convolution target (init "default" or "gaussian", DoRA or not).

    Raises:
        ConfigError: r not a multiple of the base's groups (B is a grouped 1×1 convolution), an init other than
            "default"/"gaussian" (PiSSA, OLoRA and LoftQ factor a matrix, HF PEFT runs none of them on convs), or
            DoRA on a grouped convolution.
    """
    name = type(base).__name__
    if r % base.groups:
        raise ConfigError(
            f"LoRA on {path} ({name} with groups={base.groups}) needs a rank divisible by its groups (the 1×1 "
            f"up-projection is grouped like the base, as in HF PEFT); got r={r}. Use rank_pattern={{{path!r}: "
            f"<multiple of {base.groups}>}} or leave this module out of target_modules"
        )
    kind, _ = parse_init(config.init)
    if kind not in ("default", "gaussian"):
        raise ConfigError(
            f"LoRA init {config.init!r} is not available on the convolution {path} ({name}); convolutions take init "
            f"'default' or 'gaussian' (HF PEFT's conv LoRA has no other). Leave the convolution out of target_modules"
        )
    if config.use_dora and base.groups > 1:
        raise ConfigError(
            f"DoRA on {path} ({name} with groups={base.groups}) is not supported: the LoRA update of a grouped "
            f"convolution is not a grouped weight, so the per-channel norm of W + ΔW is undefined. Use use_dora=False "
            f"or leave this module out of target_modules"
        )
    tensors = ConvLoraSlot.make_tensors(base, r)
    if kind == "gaussian":
        with torch.no_grad():
            nn.init.normal_(tensors["lora_A"], std=1.0 / r)
    if config.use_dora:
        tensors["lora_magnitude"] = ConvDoraSlot.make_magnitude(base)
        return tensors, ConvDoraSlot
    return tensors, ConvLoraSlot


def check_peft_export(path: str, base: nn.Module) -> None:
    """Refuse an HF PEFT export of a LoRA that peft would compute differently: HF PEFT builds its ``lora_A``
    convolution with the base's kernel, stride and padding only (no dilation, zero padding).

    Raises:
        ConfigError: the base is dilated (kernel > 1) or pads other than with zeros.
    """
    dilated = any(d != 1 for d in base.dilation) and any(k != 1 for k in base.kernel_size)
    if dilated or base.padding_mode != "zeros":
        what = f"dilation={tuple(base.dilation)}" if dilated else f"padding_mode={base.padding_mode!r}"
        raise ConfigError(
            f"HF PEFT can't load the LoRA on {path} ({type(base).__name__} with {what}): its lora_A convolution takes "
            f"the base's kernel, stride and padding but not its {what.split('=')[0]}, so it would compute other "
            f"outputs. Save with peftlab.save_adapter instead, or leave this module out of an HF PEFT export"
        )
