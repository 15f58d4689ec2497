r"""LoRA initialisations: ``LoraConfig(init=...)``, each matching HF PEFT's ``init_lora_weights`` of that name.

For a base weight W (d_out, d_in), rank r and scale s, the adapter starts at A (r, d_in), B (d_out, r):

* ``"default"``: A Kaiming-uniform(a=√5), B = 0 (Hu et al.).
* ``"gaussian"``: A ~ N(0, 1/r²) (std 1/r, as HF PEFT), B = 0.
* ``"pissa"`` / ``"pissa_niter_N"`` (Meng et al., 2024, arXiv:2404.02948): W = V S Uᵀ (SVD; with
  ``niter`` the randomised ``torch.svd_lowrank`` with N subspace iterations), S_r' = S_r / s,
  ``A = diag(√S_r') U_rᵀ``, ``B = V_r diag(√S_r')``: the adapter starts on the principal components.
* ``"olora"`` (Büyükakyüz, 2024, arXiv:2406.01775): W = Q R (QR), ``A = R[:r]``, ``B = Q[:, :r]``.
* ``"loftq"`` / ``"loftq_iter_N"`` (Li et al., 2023, arXiv:2310.08659): for N iterations (default 1)
  ``Q_t = quant(W − s·B_{t−1}A_{t−1})``, ``s·B_t A_t = SVD_r(W − Q_t)`` (B_0 A_0 = 0), so that
  ``Q + s·B A ≈ W`` better than Q alone. The base then holds Q.

**PiSSA and OLoRA leave the base untouched.** HF PEFT subtracts ``s·B₀A₀`` from the base weight (the
"residual model"), which changes what ``disable_adapters``, ``unwrap`` and every other adapter on the
module see. Here the slot (:class:`ResidualLoraSlot`) keeps the initial ``A₀, B₀`` as frozen buffers
and computes ``W x + s·(B A − B₀ A₀) x`` as one rank-2r LoRA product: the same function and the same
gradients as PiSSA on a residual base, with the base weights left as they were. It is exactly the
form HF PEFT converts such adapters to for sharing (``path_initial_model_for_weight_conversion``): a
plain LoRA of rank 2r, ``A' = [A; A₀]``, ``B' = [B, −B₀]``, alpha doubled (√2× with rsLoRA), which
:func:`peftlab.export_peft` writes.

**LoftQ needs W in full precision.** On a float base it quantizes W itself (NF4, blocks of 64, no
double quantization: HF PEFT's settings) and writes ``dequant(Q)`` back into the float weight, as HF
PEFT does. On a bitsandbytes base (``peftlab.load_quantized`` / ``peftlab.quantize``) the float W is
read from the model's safetensors checkpoint (``model.config._name_or_path``) and Q is made by the
layer's own quantizer (its block size, NF4/FP4, double quantization), so Q is exactly what the layer
computes with. Unlike HF PEFT (``A = R, B = L`` whatever the scale), B and A are divided by √s, so
``Q + s·B A ≈ W`` for every alpha (the two agree when alpha = r).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..layers import get_base_weight, is_conv1d

_INIT_RE = re.compile(r"(default|gaussian|olora|pissa|loftq)(?:_(niter|iter)_(\d+))?")
VALID_INITS = ("default", "gaussian", "pissa", "pissa_niter_N", "olora", "loftq", "loftq_iter_N")


def parse_init(init: Any) -> tuple[str, int | None]:
    """``"pissa_niter_4"`` -> ("pissa", 4); ``"loftq"`` -> ("loftq", 1); ConfigError naming the valid values."""
    match = _INIT_RE.fullmatch(init) if isinstance(init, str) else None
    ok = match is not None
    if ok:
        kind, tag, num = match.groups()
        ok = (tag is None) or (kind == "pissa" and tag == "niter") or (kind == "loftq" and tag == "iter")
        ok = ok and (num is None or int(num) >= (0 if kind == "pissa" else 1))
    if not ok:
        raise ConfigError(
            f"LoRA init must be one of {', '.join(VALID_INITS)} (N an integer: pissa_niter_N ≥ 0, loftq_iter_N ≥ 1), "
            f"got {init!r}"
        )
    if kind == "loftq":
        return kind, int(num) if num is not None else 1
    return kind, int(num) if num is not None else None


def modifies_base(init: str) -> bool:
    return parse_init(init)[0] == "loftq"


# ---- the residual slot (PiSSA, OLoRA) -------------------------------------------------------------


class ResidualInit(nn.Module):
    """The frozen initial factors A₀ (r, d_in) and B₀ (d_out, r) of a PiSSA/OLoRA adapter (buffers)."""

    def __init__(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", lora_A.detach().clone())
        self.register_buffer("B", lora_B.detach().clone())


def _residual_slot_class():
    from .lora import LoraSlot

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
            from .lora_ops import lora_forward

            return lora_forward(self._stacked(), x)

        def contribute(self, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
            from .lora_ops import lora_delta

            return (result + lora_delta(self._stacked(), x, self.scaling * weight)).to(result.dtype)

        def delta_weight(self) -> torch.Tensor:
            """s·(B A − B₀ A₀), (d_out, d_in) fp32."""
            init = self.layer.lora_residual[self.name]
            return (self.lora_B.float() @ self.lora_A.float() - init.B.float() @ init.A.float()) * self.scaling

        def describe(self) -> str:
            return super().describe() + ", residual init"

    return ResidualLoraSlot


_RESIDUAL_CLS = None


def residual_slot_class():
    """The :class:`ResidualLoraSlot` class (defined lazily: it subclasses LoraSlot)."""
    global _RESIDUAL_CLS
    if _RESIDUAL_CLS is None:
        _RESIDUAL_CLS = _residual_slot_class()
    return _RESIDUAL_CLS


# ---- the initialisations -----------------------------------------------------------------------------


class _small_cpu_linalg:
    """Run a CPU factorisation of a small matrix on one thread (the OpenMP pool costs more than it gains there:
    an SVD of a 64×32 matrix takes ~0.3 s on two busy threads, 0.2 ms on one)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.active = matrix.device.type == "cpu" and matrix.numel() < (1 << 22)

    def __enter__(self):
        if self.active:
            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.active:
            torch.set_num_threads(self.threads)


@torch.no_grad()
def pissa_factors(weight: torch.Tensor, r: int, scaling: float, niter: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of PiSSA for W (d_out, d_in) fp32: A = diag(√(S_r/s)) U_rᵀ (r, d_in), B = V_r diag(√(S_r/s)) (d_out, r)."""
    with _small_cpu_linalg(weight):
        if niter is None:
            v, s, uh = torch.linalg.svd(weight, full_matrices=False)
            vr, sr, uhr = v[:, :r], s[:r] / scaling, uh[:r]
        else:
            vr, sr, ur = torch.svd_lowrank(weight, r, niter=niter)
            sr, uhr = sr / scaling, ur.t()
    root = torch.sqrt(sr)
    return root.unsqueeze(1) * uhr, vr * root.unsqueeze(0)


@torch.no_grad()
def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of OLoRA for W (d_out, d_in) fp32: W = Q R, A = R[:r] (r, d_in), B = Q[:, :r] (d_out, r)."""
    with _small_cpu_linalg(weight):
        q, rr = torch.linalg.qr(weight)
    return rr[:r].contiguous(), q[:, :r].contiguous()


@torch.no_grad()
def low_rank(residual: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with s·B A the best rank-r approximation of ``residual`` (SVD, split √S on both sides)."""
    with _small_cpu_linalg(residual):
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return root.unsqueeze(1) * vh[:r], u[:, :r] * root.unsqueeze(0)


def _nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """dequant(quant(W)) in NF4, blocks of 64, no double quantization (HF PEFT's LoftQ quantizer), fp32."""
    from ..quant_layers import require_bnb

    bnb = require_bnb()
    packed, state = bnb.functional.quantize_4bit(
        weight.contiguous().float(), blocksize=64, compress_statistics=False, quant_type="nf4"
    )
    return bnb.functional.dequantize_4bit(packed, state).float()


@torch.no_grad()
def loftq(
    weight: torch.Tensor, r: int, scaling: float, iters: int, quantize=_nf4_roundtrip
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ: (dequant(Q), A, B) with Q = quant(W − s·B A) alternated with s·B A = SVD_r(W − dequant(Q)).

    ``quantize(dense) -> dequant(quant(dense))``; weight (d_out, d_in) fp32.
    """
    weight = weight.float()
    res = weight
    for i in range(iters):
        deq = quantize(res)
        a, b = low_rank(weight - deq, r, scaling)
        if i + 1 < iters:
            res = weight - scaling * (b @ a)
    return deq, a, b


def reconstruction_error(weight: torch.Tensor, deq: torch.Tensor, a=None, b=None, scaling: float = 1.0) -> float:
    """‖W − (Q + s·B A)‖_F (or ‖W − Q‖_F without A, B)."""
    approx = deq if a is None else deq + scaling * (b @ a)
    return torch.linalg.matrix_norm(weight.float() - approx).item()


# ---- the float source of a quantized base ---------------------------------------------------------------

_CONV1D_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")


class CheckpointSource:
    """Float weights of a quantized model, read from its safetensors checkpoint (one tensor at a time)."""

    def __init__(self, model: nn.Module) -> None:
        from ..models import resolve_model_path
        from ..quant_load import checkpoint_keys, safetensors_files

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
        from ..quant_load import read_tensor

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


# ---- applying an init during injection -------------------------------------------------------------------


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.device, param.dtype))


@torch.no_grad()
def apply_init(model: nn.Module, path: str, base: nn.Module, tensors: dict, config, r: int, scaling: float, txn, state: dict):
    """Initialise ``tensors`` ({"lora_A", "lora_B"}) of one target as ``config.init`` says; returns the slot class.

    Adds ``lora_residual`` (PiSSA, OLoRA) and ``lora_magnitude`` (``use_dora``) to ``tensors``. LoftQ
    writes the quantized weight into ``base`` (undone if the injection rolls back). ``state``: a dict
    shared by the targets of one injection (the checkpoint reader).
    """
    from .dora import DoraSlot
    from .lora import LoraSlot

    kind, num = parse_init(config.init)
    lora_a, lora_b = tensors["lora_A"], tensors["lora_B"]
    meta = lora_a.device.type == "meta"
    cls = LoraSlot
    if kind == "gaussian":
        nn.init.normal_(lora_a, std=1.0 / r)
    elif kind in ("pissa", "olora") and not meta:
        weight = get_base_weight(base).float()
        a, b = pissa_factors(weight, r, scaling, num) if kind == "pissa" else olora_factors(weight, r)
        _set(lora_a, a)
        _set(lora_b, b)
        tensors["lora_residual"] = ResidualInit(lora_a, lora_b)
        cls = residual_slot_class()
    elif kind in ("pissa", "olora"):
        tensors["lora_residual"] = ResidualInit(lora_a, lora_b)
        cls = residual_slot_class()
    elif kind == "loftq" and not meta:
        _loftq_layer(model, path, base, lora_a, lora_b, r, scaling, num, txn, state)
    if config.use_dora:
        tensors["lora_magnitude"] = DoraSlot.make_magnitude(base, lora_a, lora_b, scaling)
        cls = DoraSlot
    return cls


def _loftq_layer(model, path, base, lora_a, lora_b, r, scaling, iters, txn, state) -> None:
    from ..quant_layers import dequantize_weight, is_bnb_linear, requantize_weight

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


def check_config(config) -> None:
    """Config-level checks of ``init`` / ``use_dora`` (called from LoraConfig.__post_init__)."""
    kind, _ = parse_init(config.init)
    if config.use_dora and kind in ("pissa", "olora"):
        raise ConfigError(
            f"LoRA init {config.init!r} with use_dora=True is not supported; use init 'default', 'gaussian' or 'loftq' "
            f"with DoRA"
        )


# ---- HF PEFT interop --------------------------------------------------------------------------------------


def to_peft_init(config) -> tuple[Any, dict[str, Any]]:
    """(init_lora_weights, extra config keys) for an exported adapter (already trained: no init runs in peft).

    PiSSA/OLoRA export as the converted plain LoRA (rank 2r, see the module docstring), so ``True``;
    LoftQ exports ``True`` too: the adapter applies to the LoftQ-quantized base, as HF PEFT's own recipe
    saves it.
    """
    kind, _ = parse_init(config.init)
    return ("gaussian" if kind == "gaussian" else True), {}


def from_peft_init(data: dict[str, Any]) -> str:
    """Our ``init`` for a HF PEFT ``init_lora_weights`` (+ ``loftq_config``)."""
    value = data.get("init_lora_weights", True)
    if value is True or value is False or value is None:
        return "default"
    if isinstance(value, str):
        if value == "loftq":
            cfg = data.get("loftq_config") or {}
            bits = cfg.get("loftq_bits", 4)
            if bits != 4:
                raise ConfigError(f"HF PEFT LoftQ with loftq_bits={bits} is not supported by peftlab (4 only)")
            iters = cfg.get("loftq_iter", 1)
            return "loftq" if iters == 1 else f"loftq_iter_{iters}"
        try:
            parse_init(value)
            return value
        except ConfigError:
            pass
    raise ConfigError(
        f"HF PEFT init_lora_weights={value!r} is not supported by peftlab; supported: True, False, "
        f"{', '.join(VALID_INITS[1:])}"
    )


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
    from ..io import adapter_state_dict

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
