r"""LoRA on ``nn.MultiheadAttention`` (HF PEFT's ``lora.MultiheadAttention``).

``nn.MultiheadAttention`` has no linear layers that run: its forward reads the packed query/key/value weight
``in_proj_weight`` (3d × d) and ``out_proj.weight`` (d × d) directly (a LoRA on ``out_proj`` by name never runs).
As in HF PEFT, both get a rank-r LoRA and the module's own forward runs on the adapted weights::

    W_in' = W_in + s · B A         A (r, d) Kaiming-uniform,  B (3d, r) = 0
    W_out' = W_out + s · B_o A_o    A_o (r, d) Kaiming-uniform,  B_o (d, r) = 0

(reparametrized per forward through :meth:`AdapterLayer.adapted_base_forward`, so attention masks, ``need_weights`` and
every fast path are the module's own). Merging adds s·B A into both weights exactly. The factors are stored as HF
PEFT stores them: ``lora_A``/``lora_B`` of the module for the input projection, the out projection's under
``base_layer.out_proj`` in its export. Limits (HF PEFT's too): separate q/k/v weights (``kdim``/``vdim`` ≠
``embed_dim``) and DoRA are refused; dropout does not apply (the input never meets a factor alone).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ...core.layer import Slot
from ...util.errors import ConfigError
from .inits import parse_init
from .slot import adapter_tensor_kwargs

IN_PARAM, OUT_PARAM = "in_proj_weight", "out_proj.weight"
ROLE_OUT_A, ROLE_OUT_B = "lora_out_A", "lora_out_B"
#: HF PEFT's key of the out projection's factors, below the module
PEFT_OUT = "base_layer.out_proj"


class MhaLoraSlot(Slot):
    """LoRA on an ``nn.MultiheadAttention``'s in and out projection weights (module docstring); same constructor
    as :class:`~peftlab.methods.lora.slot.LoraSlot`."""

    roles = ("lora_A", "lora_B", ROLE_OUT_A, ROLE_OUT_B)
    method = "lora"
    params = (IN_PARAM, OUT_PARAM)
    #: its attention mask need not be per row, and without batch_first the rows are not first: no mixed batches
    #: (HF PEFT 0.21 refuses them too)
    rows_separable = False

    def __init__(self, layer, name: str, r: int, alpha: float, scaling: float, dropout: float = 0.0,
                 use_kernel: str = "auto") -> None:  # fmt: skip
        super().__init__(layer, name)
        self.r, self.alpha, self.scaling = r, alpha, scaling

    @staticmethod
    def make_tensors(base: nn.Module, r: int, gaussian: bool = False) -> dict[str, nn.Parameter]:
        kw = adapter_tensor_kwargs(base.out_proj)
        d = base.embed_dim
        out = {}
        for role_a, role_b, d_out in (("lora_A", "lora_B", 3 * d), (ROLE_OUT_A, ROLE_OUT_B, d)):
            a = torch.empty(r, d, **kw)
            if gaussian:
                nn.init.normal_(a, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            out[role_a], out[role_b] = nn.Parameter(a), nn.Parameter(torch.zeros(d_out, r, **kw))
        return out

    def factors(self, param: str) -> tuple[torch.Tensor, torch.Tensor]:
        roles = ("lora_A", "lora_B") if param == IN_PARAM else (ROLE_OUT_A, ROLE_OUT_B)
        return self.tensor(roles[0]), self.tensor(roles[1])

    def reparametrized(self, param: str, value: torch.Tensor, weight: float) -> torch.Tensor:
        """value + w·s·B A (differentiable in A and B)."""
        a, b = self.factors(param)
        return torch.addmm(value, b.to(value.dtype), a.to(value.dtype), alpha=self.scaling * weight)

    def describe(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, in_proj_weight and out_proj.weight"


def mha_slot(base: nn.Module, r: int, config, path: str) -> tuple[dict[str, nn.Parameter], type]:
    """Fresh tensors and the slot class for an ``nn.MultiheadAttention`` target.

    Raises:
        ConfigError: separate q/k/v weights, DoRA, or an init other than "default"/"gaussian".
    """
    if not base._qkv_same_embed_dim:
        raise ConfigError(
            f"LoRA on {path} (nn.MultiheadAttention with kdim/vdim ≠ embed_dim) is not supported: its q/k/v weights are "
            f"separate parameters, which HF PEFT's MultiheadAttention LoRA does not adapt either. Leave it out of "
            f"target_modules"
        )
    kind, _ = parse_init(config.init)
    if config.use_dora or kind not in ("default", "gaussian"):
        raise ConfigError(
            f"LoRA on {path} (nn.MultiheadAttention) takes init 'default' or 'gaussian' without DoRA (as HF PEFT); got "
            f"init={config.init!r}, use_dora={config.use_dora}. Leave the module out of target_modules for these"
        )
    if not isinstance(base.out_proj, nn.Linear):
        raise ConfigError(f"LoRA on {path}: its out_proj is a {type(base.out_proj).__name__}, not an nn.Linear")
    return MhaLoraSlot.make_tensors(base, r, gaussian=kind == "gaussian"), MhaLoraSlot


def warn_peft_export(layers: dict[str, nn.Module], name: str) -> None:
    """Warn when an HF PEFT export holds a non-zero out-projection LoRA (``layers``: {path: wrapper}): HF PEFT
    (0.21) adds its delta twice in forward and merge (huggingface/peft#3774), so peft computes
    W_out + 2·s·B_o A_o there until that fix."""
    hit = [p for p, layer in layers.items() if layer.lora_out_B[name].detach().any()]
    if hit:
        warnings.warn(
            f"HF PEFT's MultiheadAttention LoRA (0.21) applies the out_proj delta twice (huggingface/peft#3774), so "
            f"peft's outputs for this export differ from peftlab's at {', '.join(hit[:3])}{' ...' if len(hit) > 3 else ''} "
            f"until that fix; the tensors round-trip exactly",
            stacklevel=4,
        )


def to_peft_key(key: str) -> str | None:
    """``x.lora_out_A`` -> ``x.base_layer.out_proj.lora_A`` (HF PEFT's layout), else None."""
    for ours, theirs in ((ROLE_OUT_A, "lora_A"), (ROLE_OUT_B, "lora_B")):
        if key.endswith("." + ours):
            return f"{key[: -len(ours)]}{PEFT_OUT}.{theirs}"
    return None


def from_peft_key(key: str) -> str | None:
    """``x.base_layer.out_proj.lora_A`` -> ``x.lora_out_A``, else None."""
    for ours, theirs in ((ROLE_OUT_A, "lora_A"), (ROLE_OUT_B, "lora_B")):
        if key.endswith(f".{PEFT_OUT}.{theirs}"):
            return f"{key[: -len(PEFT_OUT + '.' + theirs)]}{ours}"
    return None
