r"""How a LoRA target starts: the init (``LoraConfig(init=...)``) and the variant (``use_dora``), as a
declarative map from name to what it does, read by the injection (:func:`apply_init`).

Each init entry takes the fresh tensors of one target (``lora_A`` (r, d_in), ``lora_B`` (d_out, r)) and may
change them, add tensors (``lora_residual``) and choose the slot class; the maths lives in
:mod:`peftlab.methods.lora.inits`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...backends.quant.bnb import dequantize_weight, is_bnb_linear, requantize_weight
from ...core.layer import get_base_weight, is_conv1d
from ...util.checkpoints import checkpoint_keys, read_tensor, safetensors_files
from ...util.errors import ConfigError
from ...util.models import resolve_model_path
from .dora import DoraSlot
from .inits import loftq, olora_factors, parse_init, pissa_factors
from .residual import ResidualInit, ResidualLoraSlot
from .slot import LoraSlot

#: model types whose checkpoints store linear weights transposed (GPT-2 ``Conv1D``)
_CONV1D_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")


class CheckpointSource:
    """Float weights of a quantized model, read from its safetensors checkpoint (one tensor at a time)."""

    def __init__(self, model: nn.Module) -> None:
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", None) or ""
        try:
            folder = Path(resolve_model_path(name)) if name else None
        except Exception:  # noqa: BLE001 - reported below with what is needed
            folder = None
        if folder is None or not folder.is_dir():
            raise ConfigError(
                f"LoRA init 'loftq' on a quantized base needs the full-precision weights: the model's checkpoint "
                f"({name or 'model.config._name_or_path is empty'}) is not a local folder. Load it with "
                f"peftlab.load_quantized(<local folder or packaged name>), or wrap the full-precision model "
                f"(init='loftq' quantizes it to NF4 itself)"
            )
        self.files = safetensors_files(folder)
        self.index = {key: file for file, key in checkpoint_keys(self.files)}
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.conv1d = getattr(config, "model_type", "") in _CONV1D_TYPES

    def weight(self, path: str, shape: tuple[int, int]) -> torch.Tensor:
        """The float (d_out, d_in) weight of the module at ``path``."""
        names = [f"{path}.weight"]
        if self.prefix:
            names += [f"{self.prefix}.{path}.weight", path.removeprefix(self.prefix + ".") + ".weight"]
        for key in names:
            if key in self.index:
                tensor = read_tensor(self.index[key], key).float()
                if self.conv1d or (tuple(tensor.shape) != tuple(shape) and tuple(tensor.t().shape) == tuple(shape)):
                    tensor = tensor.t()
                if tuple(tensor.shape) != tuple(shape):
                    break
                return tensor.contiguous()
        raise ConfigError(
            f"LoRA init 'loftq': no full-precision weight of shape {list(shape)} for {path} in the checkpoint "
            f"({self.files[0].parent}); is the model the one load_quantized loaded?"
        )


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.device, param.dtype))


def _gaussian(model, path, base, tensors, r, scaling, num, txn, shared) -> type:
    """A ~ N(0, 1/r²) (std 1/r, as HF PEFT), B = 0."""
    nn.init.normal_(tensors["lora_A"], std=1.0 / r)
    return LoraSlot


def _residual(factors):
    """PiSSA / OLoRA: A, B from ``factors(W, r, scaling, num)``; A₀, B₀ kept frozen (:class:`ResidualLoraSlot`)."""

    def init(model, path, base, tensors, r, scaling, num, txn, shared) -> type:
        lora_a, lora_b = tensors["lora_A"], tensors["lora_B"]
        if lora_a.device.type != "meta":
            a, b = factors(get_base_weight(base).float(), r, scaling, num)
            _set(lora_a, a)
            _set(lora_b, b)
        tensors["lora_residual"] = ResidualInit(lora_a, lora_b)
        return ResidualLoraSlot

    return init


def _loftq(model, path, base, tensors, r, scaling, num, txn, shared) -> type:
    if tensors["lora_A"].device.type != "meta":
        _loftq_layer(model, path, base, tensors["lora_A"], tensors["lora_B"], r, scaling, num, txn, shared)
    return LoraSlot


#: ``LoraConfig(init=...)`` kind -> ``init(model, path, base, tensors, r, scaling, num, txn, shared) -> slot class``;
#: ``None``: the fresh tensors as they are (Kaiming A, zero B).
INITS = {
    "default": None,
    "gaussian": _gaussian,
    "pissa": _residual(lambda w, r, s, niter: pissa_factors(w, r, s, niter)),
    "olora": _residual(lambda w, r, s, _num: olora_factors(w, r)),
    "loftq": _loftq,
}


def _dora(base, tensors, scaling, cls: type) -> type:
    tensors["lora_magnitude"] = DoraSlot.make_magnitude(base, tensors["lora_A"], tensors["lora_B"], scaling)
    return DoraSlot


#: ``LoraConfig`` flag -> ``variant(base, tensors, scaling, slot class) -> slot class``, applied after the init.
VARIANTS = {"use_dora": _dora}


@torch.no_grad()
def apply_init(model: nn.Module, path: str, base: nn.Module, tensors: dict, config, r: int, scaling: float, txn, state: dict):
    """Initialise ``tensors`` ({"lora_A", "lora_B"}) of one target as ``config.init`` says; returns the slot class.

    Reads :data:`INITS` and :data:`VARIANTS`: an init may add ``lora_residual`` (PiSSA, OLoRA), a variant
    ``lora_magnitude`` (``use_dora``). LoftQ writes the quantized weight into ``base`` (undone if the
    injection rolls back). ``state``: a dict shared by the targets of one injection (the checkpoint reader).
    """
    kind, num = parse_init(config.init)
    init = INITS[kind]
    cls = LoraSlot if init is None else init(model, path, base, tensors, r, scaling, num, txn, state)
    for flag, variant in VARIANTS.items():
        if getattr(config, flag, False):
            cls = variant(base, tensors, scaling, cls)
    return cls


def _loftq_layer(model, path, base, lora_a, lora_b, r, scaling, iters, txn, state) -> None:
    if is_bnb_linear(base):
        if "source" not in state:
            state["source"] = CheckpointSource(model)
        old_weight, old_state = base.weight, getattr(base, "quant_state", None)
        shape = (base.out_features, base.in_features)
        weight = state["source"].weight(path, shape).to(old_weight.device)

        def layer_quant(dense):
            requantize_weight(base, dense)
            return dequantize_weight(base).float()

        def undo():
            base.weight = old_weight
            if old_state is not None:
                base.quant_state = old_state

        txn.undo.append(undo)
        _deq, a, b = loftq(weight, r, scaling, iters, layer_quant)  # the layer now holds the last Q
    else:
        weight = get_base_weight(base)
        if not weight.is_floating_point():
            raise ConfigError(f"LoRA init 'loftq': {path} has a {weight.dtype} weight that peftlab cannot read as float")
        deq, a, b = loftq(weight.float(), r, scaling, iters)
        old = base.weight.data

        def undo():
            base.weight.data = old

        txn.undo.append(undo)
        new = deq.t() if is_conv1d(base) else deq
        base.weight.data = new.to(old.dtype).contiguous()
    _set(lora_a, a)
    _set(lora_b, b)


