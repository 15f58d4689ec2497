r"""LoRA on parameters (``LoraConfig.target_parameters``): 3-D expert stacks of MoE blocks and 2-D weights of
modules that are not linear layers (a router), with HF PEFT's semantics (its ``lora.ParamWrapper``).

transformers 5 stores the experts of Qwen3-MoE, OLMoE, Mixtral, GPT-OSS, DeepSeek-V3 and Llama-4 as one
``nn.Parameter`` W of shape (E, d1, d2) per projection. Each expert e gets its own rank-r update::

    W'_e = W_e + s · ΔW_e,      s = alpha / r   (rsLoRA: alpha / √r)
    (E, d_out, d_in) layout (the default):          ΔW_e = B_e A_e
    (E, d_in, d_out) layout (``is_transposed``):    ΔW_e = A_eᵀ B_eᵀ

with the factors stored as HF PEFT stores them: ``A`` (E·r, d_in), Kaiming-uniform, row block e = A_e (r, d_in);
``B`` (d_out, E·r), zero, B_e = ``B.view(d_out, r, E)[:, :, e]``. A 2-D parameter (d_out, d_in) is one expert
(E = 1): W' = W + s·B A. The module's own forward runs on W' (one ``baddbmm`` per forward), so whatever routing
or kernel the module uses sees the adapted experts; merge folds s·ΔW into W and unmerge subtracts it.

Limits (HF PEFT's too): no dropout (x cannot be factored out of the expert matmuls), no DoRA. Mixed-adapter batches
(:mod:`peftlab.serving.param_rows`) and ``combine`` work; HF PEFT 0.21 refuses both for ``ParamWrapper``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ...core.layer import Slot
from ...core.state import base_layer_of, submodule, wrapped_layers
from ...core.structure import base_view, head_module_names, is_linear
from ...core.targeting import paths_regex
from ...util.errors import TargetError
from .config import LoraConfig, pattern_value

ROLE_A, ROLE_B = "lora_param_A", "lora_param_B"


def param_layout(module: nn.Module, value: torch.Tensor) -> tuple[int, int, int, bool]:
    """(experts E, d_in, d_out, transposed) of a targeted parameter, as HF PEFT reads them.

    A 3-D (E, d1, d2) stack is (E, d_out, d_in) unless the module says ``is_transposed`` (GPT-OSS):
    then (E, d_in, d_out). A 2-D weight is (d_out, d_in).
    """
    if value.ndim == 3:
        e, d1, d2 = value.shape
        transposed = bool(getattr(module, "is_transposed", False))
        return (e, d1, d2, True) if transposed else (e, d2, d1, False)
    if value.ndim == 2:
        return 1, value.shape[1], value.shape[0], False
    raise TargetError(f"target_parameters: a {value.ndim}-D parameter cannot take LoRA (2-D weights and 3-D expert stacks can)")


class ParamLoraSlot(Slot):
    """LoRA on named parameters of one module (see the module docstring), one adapter.

    Tensors: ``layer.lora_param_A[name][param]`` (E·r, d_in) and ``layer.lora_param_B[name][param]`` (d_out, E·r).

    Args:
        layer: the owning AdapterLayer; name: the adapter name.
        specs: ``{param: (r, alpha, scaling)}`` for each adapted parameter of the base module, in its order.
    """

    roles = (ROLE_A, ROLE_B)
    method = "lora"

    def __init__(self, layer, name: str, specs: dict[str, tuple[int, float, float]]) -> None:
        super().__init__(layer, name)
        self.params = tuple(specs)
        self.specs = dict(specs)
        self.layouts = {p: param_layout(layer.base_layer, getattr(layer.base_layer, p)) for p in self.params}

    @staticmethod
    def make_tensors(base: nn.Module, specs: dict[str, tuple[int, float, float]], gaussian: bool = False) -> dict:
        """Fresh factors for every parameter in ``specs``: A Kaiming-uniform(a=√5) (or N(0, 1/r)), B = 0."""
        a_dict, b_dict = nn.ParameterDict(), nn.ParameterDict()
        for param, (r, _, _) in specs.items():
            value = getattr(base, param)
            e, d_in, d_out, _ = param_layout(base, value)
            dtype = value.dtype if value.is_floating_point() and value.element_size() >= 4 else torch.float32
            a = torch.empty(e * r, d_in, device=value.device, dtype=dtype)
            if gaussian:
                nn.init.normal_(a, std=1 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            a_dict[param] = nn.Parameter(a)
            b_dict[param] = nn.Parameter(torch.zeros(d_out, e * r, device=value.device, dtype=dtype))
        return {ROLE_A: a_dict, ROLE_B: b_dict}

    def factors(self, param: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(L (E, d1, r), R (E, r, d2), s) with ΔW = s · L R in the parameter's own (E, d1, d2) layout."""
        e, _, d_out, transposed = self.layouts[param]
        a = self.layer.lora_param_A[self.name][param]
        b = self.layer.lora_param_B[self.name][param]
        r = a.shape[0] // e
        a_e = a.reshape(e, r, a.shape[-1])  # (E, r, d_in)
        b_e = b.reshape(d_out, r, e).permute(2, 0, 1)  # (E, d_out, r)
        lhs, rhs = (a_e.transpose(1, 2), b_e.transpose(1, 2)) if transposed else (b_e, a_e)
        return lhs, rhs, self.specs[param][2]

    def param_low_rank_factors(self, param: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (E, r, d_in), B (E, d_out, r), s): expert e's update is s·B_e A_e in the (d_out, d_in) orientation,
        whatever the stack's layout (what ``combine`` stacks)."""
        e, _, d_out, _ = self.layouts[param]
        a = self.layer.lora_param_A[self.name][param]
        b = self.layer.lora_param_B[self.name][param]
        r = a.shape[0] // e
        return a.reshape(e, r, a.shape[-1]), b.reshape(d_out, r, e).permute(2, 0, 1), self.specs[param][2]

    def param_tensors(self, param: str, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """HF PEFT's stored layout of per-expert factors a (E, r, d_in), b (E, d_out, r): A (E·r, d_in) with row
        block e = a_e, B (d_out, r·E) with B.view(d_out, r, E)[:, :, e] = b_e."""
        e, r, d_in = a.shape
        return {f"{ROLE_A}.{param}": a.reshape(e * r, d_in), f"{ROLE_B}.{param}": b.permute(1, 2, 0).reshape(b.shape[1], r * e)}

    def delta(self, param: str) -> torch.Tensor:
        """s · ΔW in the parameter's shape, fp32."""
        lhs, rhs, s = self.factors(param)
        delta = torch.bmm(lhs.float(), rhs.float()) * s
        return delta if getattr(self.layer.base_layer, param).ndim == 3 else delta[0]

    def reparametrized(self, param: str, value: torch.Tensor, weight: float) -> torch.Tensor:
        lhs, rhs, s = self.factors(param)
        lhs, rhs = lhs.to(value.dtype), rhs.to(value.dtype)
        if value.ndim == 3:
            return torch.baddbmm(value, lhs, rhs, alpha=s * weight)
        return torch.addmm(value, lhs[0], rhs[0], alpha=s * weight)

    def describe(self) -> str:
        return ", ".join(f"{p}: r={r}, scaling={s:g}" for p, (r, _, s) in self.specs.items())


# ---- which parameters ------------------------------------------------------------------------------


def resolve_parameters(model: nn.Module, names: Iterable[str], skip: Iterable[str] = ()) -> dict[str, list[str]]:
    """``{module path: [parameter names in the module's order]}`` for ``target_parameters`` (HF PEFT's matching:
    a parameter path equal to a name or ending in ``'.' + name``).

    Raises:
        TargetError: a name matched no parameter (lists the 3-D parameters), or it matched one of the top-level
            module, or a parameter that is neither 2-D nor 3-D.
    """
    names = list(names)
    skip_prefixes = tuple(s + "." for s in skip)
    found: dict[str, list[str]] = {}
    used: set[str] = set()
    for path, module in base_view(model):
        if path in skip or path.startswith(skip_prefixes):
            continue
        for param, value in module.named_parameters(recurse=False):
            key = f"{path}.{param}" if path else param
            hit = [n for n in names if key == n or key.endswith("." + n)]
            if not hit:
                continue
            if not path:
                raise TargetError(f"target_parameters {hit}: parameter {param!r} of the top-level module cannot be targeted")
            if value.ndim not in (2, 3):
                raise TargetError(
                    f"target_parameters {hit} matched {key} of shape {list(value.shape)}: only 2-D weights and 3-D "
                    f"expert stacks take LoRA"
                )
            used.update(hit)
            found.setdefault(path, []).append(param)
    unmatched = [n for n in names if n not in used]
    if unmatched:
        stacks = [f"{p}.{n}" for p, m in base_view(model) for n, v in m.named_parameters(recurse=False) if v.ndim == 3]
        raise TargetError(
            f"target_parameters {unmatched} matched no parameter of {type(model).__name__}; 3-D expert parameters "
            f"here: {', '.join(stacks[:6]) or 'none'}"
        )
    return found


def fused_expert_parameters(model: nn.Module) -> dict[str, int]:
    """``{parameter path: k}`` of the expert stacks that transformers builds, on loading a checkpoint, from k
    per-expert linear layers (its checkpoint conversion mapping for the model type: Mixtral's ``w1``/``w3`` into
    ``gate_up_proj`` has k = 2), plus each such MoE block's router weight (k = 1) when the router is not a linear
    layer. These are linear layers in every checkpoint of the model, so ``all-linear`` adapts them, as HF PEFT's
    all-linear does (it gives a fused stack rank k·r and alpha k·alpha).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        mapping = get_checkpoint_conversion_mapping(model_type) or []
    except (ImportError, AttributeError, KeyError, TypeError):
        return {}
    fused: dict[str, int] = {}  # target suffix (e.g. "mlp.experts.gate_up_proj") -> number of source linears
    for conv in mapping:
        sources = list(getattr(conv, "source_patterns", None) or [])
        targets = list(getattr(conv, "target_patterns", None) or [])
        if type(conv).__name__ != "WeightConverter" or len(targets) != 1:
            continue
        if sources and all(".*." in s and s.endswith(".weight") for s in sources):
            fused[targets[0].strip(".")] = len(sources)
    if not fused:
        return {}
    out: dict[str, int] = {}
    blocks: dict[str, int] = {}
    for path, module in base_view(model):
        for param, value in module.named_parameters(recurse=False):
            key = f"{path}.{param}"
            k = next((k for suffix, k in fused.items() if key.endswith("." + suffix) or key == suffix), None)
            if k is not None and value.ndim == 3:
                out[key] = k
                blocks[path.rpartition(".")[0]] = value.shape[0]
    for block, experts in blocks.items():
        for child_name, child in base_layer_of(submodule(model, block)).named_children():
            child = getattr(child, "base_layer", child)
            weight = getattr(child, "weight", None)
            if is_linear(child) or not isinstance(weight, nn.Parameter) or weight.ndim != 2:
                continue
            if weight.shape[0] == experts:  # the router: one logit per expert
                out[f"{block}.{child_name}.weight"] = 1
    return out


def linear_subclass_weights(model: nn.Module) -> dict[str, int]:
    """``{path.weight: 1}`` of ``nn.Linear`` subclasses that are not linear layers (a model-defined forward, e.g.
    Llama-4's router): ``all-linear`` adapts their weight as a parameter, which keeps the module's own forward."""
    heads = head_module_names(model)
    return {
        f"{p}.weight": 1 for p, m in base_view(model)
        if isinstance(m, nn.Linear) and not is_linear(m) and p not in heads and not p.endswith(".base_layer")
    }  # fmt: skip


def parameter_specs(model: nn.Module, config: LoraConfig, skip) -> dict[str, dict[str, tuple[int, float, float]]]:
    """``{module path: {parameter: (r, alpha, scaling)}}``: ``target_parameters``, plus under ``all-linear`` the
    expert stacks that are linear layers in the model's checkpoints (:func:`.params.fused_expert_parameters`,
    rank k·r and alpha k·alpha for a stack fused from k linears, as HF PEFT); the per-module patterns win."""
    wanted: dict[str, int] = {}
    if config.target_modules == "all-linear":
        found = {**fused_expert_parameters(model), **linear_subclass_weights(model)}
        wanted = {k: v for k, v in found.items() if not any(k.startswith(s + ".") for s in skip)}
    if config.target_parameters:
        for path, names in resolve_parameters(model, config.target_parameters, skip).items():
            wanted.update({f"{path}.{n}": wanted.get(f"{path}.{n}", 1) for n in names})
    if config.target_modules == "all-linear":
        warn_skipped_stacks(model, wanted)
    out: dict[str, dict[str, tuple[int, float, float]]] = {}
    order = {f"{p}.{n}": i for i, (p, n) in enumerate((p, n) for p, m in base_view(model) for n, _ in m.named_parameters(recurse=False))}
    for key in sorted(wanted, key=order.__getitem__):
        k = wanted[key]
        r = pattern_value(config.rank_pattern, key, config.r * k)
        alpha = pattern_value(config.alpha_pattern, key, config.alpha * k)
        path, _, name = key.rpartition(".")
        out.setdefault(path, {})[name] = (r, alpha, config.scaling(r, alpha))
    return out


def warn_skipped_stacks(model: nn.Module, adapted: Iterable[str]) -> None:
    """``all-linear`` warns about 3-D expert stacks it leaves alone (they were never linear layers in the model's
    checkpoints, and HF PEFT's all-linear skips them too), naming them and how to adapt them."""
    adapted = set(adapted)
    skipped = [
        f"{p}.{n}" for p, m in base_view(model) for n, v in m.named_parameters(recurse=False)
        if v.ndim == 3 and f"{p}.{n}" not in adapted
    ]  # fmt: skip
    if skipped:
        names = sorted({s.rsplit(".", 1)[-1] for s in skipped})
        warnings.warn(
            f"target_modules='all-linear' adapts linear layers only; {len(skipped)} 3-D expert parameters stay "
            f"frozen ({', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}), as in HF PEFT. To adapt them, "
            f"add target_parameters={names!r}",
            stacklevel=6,  # the caller of peftlab.wrap
        )


# ---- HF PEFT's layout ------------------------------------------------------------------------------


def peft_key_map(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """``{our key: HF PEFT's key}`` (both without the adapter name and the ``.weight`` suffix) for one adapter's
    parameter LoRA. HF PEFT nests one ``ParamWrapper`` per parameter, the first in the module's order innermost,
    so the k-th of n adapted parameters of a module sits under n−1−k ``base_layer`` s:
    ``experts.lora_param_A.gate_up_proj`` -> ``experts.base_layer.lora_A`` (n = 2, k = 0)."""
    out: dict[str, str] = {}
    for path, slot in _param_slots(model, adapter_name).items():
        n = len(slot.params)
        for k, param in enumerate(slot.params):
            peft_path = path + ".base_layer" * (n - 1 - k)
            out[f"{path}.{ROLE_A}.{param}"] = f"{peft_path}.lora_A"
            out[f"{path}.{ROLE_B}.{param}"] = f"{peft_path}.lora_B"
    return out


def _param_slots(model: nn.Module, adapter_name: str) -> dict[str, ParamLoraSlot]:
    return {
        path: layer.slots[adapter_name]
        for path, layer in wrapped_layers(model, adapter_name)
        if isinstance(layer.slots[adapter_name], ParamLoraSlot)
    }


def peft_parameter_fields(model: nn.Module, adapter_name: str, config) -> dict:
    """``target_parameters`` (the shortest dotted suffixes that select exactly the adapted parameters) and the
    ``rank_pattern`` / ``alpha_pattern`` entries HF PEFT needs for parameters whose rank or alpha differs from
    the config's (all-linear's fused stacks), as full-path regexes; empty when the adapter targets no parameter."""
    slots = _param_slots(model, adapter_name)
    if not slots:
        return {}
    adapted = [f"{p}.{n}" for p, s in slots.items() for n in s.params]
    everything = [f"{p}.{n}" for p, m in base_view(model) if p for n, _ in m.named_parameters(recurse=False)]
    depth = 1
    while True:
        names = sorted({".".join(a.split(".")[-depth:]) for a in adapted})
        if {k for k in everything if any(k == n or k.endswith("." + n) for n in names)} == set(adapted):
            break
        depth += 1
    ranks: dict[tuple[int, float], list[str]] = {}
    for path, slot in slots.items():
        for param, (r, alpha, _) in slot.specs.items():
            key = f"{path}.{param}"
            given = any(re.match(rf"(.*\.)?({k})$", key) for k in (*config.rank_pattern, *config.alpha_pattern))
            if (r, alpha) != (config.r, config.alpha) and not given:
                ranks.setdefault((r, alpha), []).append(key)
    rank_pattern = {paths_regex(keys): r for (r, _), keys in ranks.items()}
    alpha_pattern = {paths_regex(keys): alpha for (_, alpha), keys in ranks.items()}
    return {"target_parameters": names, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
