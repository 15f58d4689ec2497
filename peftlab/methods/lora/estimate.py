"""How the memory estimator counts LoRA: one (r, d_in) A and (d_out, r) B per target, what the LoRA autograd
function saves (:func:`peftlab.backends.lora_ops.lora_saved_bytes`: x and x·Aᵀ, the dropout mask regenerated),
and the biases its ``bias`` mode trains. DoRA (``use_dora``) adds a (d_out,) magnitude per target and what its
scale function saves (:func:`peftlab.methods.lora.dora.dora_saved_bytes`: the LoRA output y_lora, which dL/dm
needs, and two (d_out,) vectors)."""

from __future__ import annotations

from torch import nn

from ...backends.lora_ops import HALF_PRODUCT_DEVICES, lora_gemm_outputs, lora_saved_bytes
from ...core.registry import EstimateRules
from ...core.structure import is_linear
from ...core.targeting import resolve_targets
from ...util.errors import ConfigError
from .dora import dora_saved_bytes
from .params import param_layout, parameter_specs


def adapted_linears(model: nn.Module, config, skip: list[str]) -> dict[str, int]:
    """``{path: r}`` of the linear targets.

    Raises:
        ConfigError: a target the estimator does not model (an embedding, a convolution, multi-head attention, or
            ``trainable_token_indices``), named with what it can model.
    """
    if getattr(config, "target_parameters", None) and config.target_modules is None:
        return {}  # the parameters alone (HF PEFT's semantics)
    paths = resolve_targets(model, config.target_modules, predicate=lambda m: True, skip=skip)
    other = [p for p in paths if not is_linear(model.get_submodule(p))]
    if other or getattr(config, "trainable_token_indices", None):
        what = f"{other[0]} ({type(model.get_submodule(other[0])).__name__})" if other else "trainable_token_indices"
        raise ConfigError(
            f"the memory estimator models LoRA on linear layers and expert parameters only, not {what}; estimate "
            f"without it (its adapter tensors are small beside the activations), or measure with peftlab bench"
        )
    return {path: config.rank_and_alpha(path)[0] for path in paths}


def parameter_lora(model: nn.Module, config, counts) -> list[int]:
    """A (E·r, d_in) and B (d_out, E·r) per adapted parameter (``target_parameters``, all-linear's expert stacks).
    Not modelled: the adapted copy W + s·ΔW of each expert stack that the experts' matmuls keep for backward."""
    sizes = []
    for path, specs in parameter_specs(model, config, []).items():
        module = model.get_submodule(path)
        for name, (r, _, _) in specs.items():
            experts, d_in, d_out, _ = param_layout(module, getattr(module, name))
            sizes += [experts * r * d_in, d_out * experts * r]
    return sizes


def linear_params(r: int, d_in: int, d_out: int) -> list[int]:
    return [r * d_in, d_out * r]


def linear_saved(graph, x: str, out: str, lin, m: int) -> None:
    """x (M, d_in) and xa = x Aᵀ (M, r); the base GEMM's output when it is not fused (int8 bases)."""
    e, a = graph.e, graph.a
    if graph.device in HALF_PRODUCT_DEVICES and e < a:  # half activations: thin products in their dtype
        a = e  # (peftlab.backends.lora_ops.lora_dtype)
    rule = lora_saved_bytes(m, lin.d_in, lin.r, e, a)
    graph.save(x, rule["x"])
    graph.save(out + ".xa", rule["xa"])
    graph.gemm += lora_gemm_outputs(m, lin.d_out, lin.r, e, a, fused_base=not lin.quantized or lin.four_bit)
    graph.rg[out] = True


def trains_base(config, path: str, pname: str, is_target: bool) -> bool:
    if config.bias == "all":
        return "bias" in pname
    return config.bias == "lora_only" and is_target and pname == "bias"


def dora_linear_params(r: int, d_in: int, d_out: int) -> list[int]:
    return [*linear_params(r, d_in, d_out), d_out]  # + the magnitude m


def dora_linear_saved(graph, x: str, out: str, lin, m: int) -> None:
    """LoRA's saves, then DoraScaleFunction's: y_lora (M, d_out), the scale's private input, and n, m/n."""
    linear_saved(graph, x, out, lin, m)
    for name, nbytes in dora_saved_bytes(m, lin.d_out, graph.e).items():
        graph.save(f"{out}.dora.{name}", nbytes)


_COMMON = dict(adapted_linears=adapted_linears, trains_base=trains_base, quantized_base=True, extra_params=parameter_lora)
DORA_RULES = EstimateRules(linear_params=dora_linear_params, linear_saved=dora_linear_saved, **_COMMON)
RULES = EstimateRules(
    linear_params=linear_params,
    linear_saved=linear_saved,
    for_config=lambda config: DORA_RULES if config.use_dora else RULES,
    **_COMMON,
)
