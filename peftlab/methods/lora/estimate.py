"""How the memory estimator counts LoRA: one (r, d_in) A and (d_out, r) B per target, what the LoRA autograd
function saves (:func:`peftlab.backends.lora_ops.lora_saved_bytes`: x and x·Aᵀ, the dropout mask regenerated),
and the biases its ``bias`` mode trains. DoRA (``use_dora``) adds a (d_out,) magnitude per target and what its
scale function saves (:func:`peftlab.methods.lora.dora.dora_saved_bytes`: the LoRA output y_lora, which dL/dm
needs, and two (d_out,) vectors).

On an input embedding (V × d, :mod:`.embedding`), LoRA holds A (r, V) and B (d, r) and saves the looked-up rows
Aᵀ[x] (M, r) that dB needs; trainable tokens (:mod:`.tokens`) hold T (k, d) and save the clamped row index
(M, int64) and the in-I mask (M, bool) of their lookup, and on a tied output head also its input (M, d),
T − E[I] (k, d), I and the (M, k) logits it adds. Either makes the embeddings' output require grad, so the first block saves its input too.
Their gradients arrive after every block's backward (a tied head's rows: at the loss)."""

from __future__ import annotations

from torch import nn

from ...backends.lora_ops import HALF_PRODUCT_DEVICES, lora_gemm_outputs, lora_saved_bytes
from ...core.registry import EstimateRules
from ...core.structure import is_linear
from ...core.targeting import resolve_targets
from ...util.errors import ConfigError
from .dora import dora_saved_bytes
from .embedding import check_embedding_config
from .params import param_layout, parameter_specs
from .tokens import tied_modules, token_targets

NOTES = "lora"  # key of this method's entry in Counts.notes


def _module_targets(model: nn.Module, config, skip) -> list[str]:
    if getattr(config, "target_parameters", None) and config.target_modules is None:
        return []  # the parameters alone (HF PEFT's semantics)
    return resolve_targets(model, config.target_modules, predicate=lambda m: True, skip=skip)


def adapted_linears(model: nn.Module, config, skip: list[str]) -> dict[str, int]:
    """``{path: r}`` of the linear targets (embedding targets are counted by :func:`extra_lora`).

    Raises:
        ConfigError: a target the estimator does not model (a convolution or multi-head attention, which the
            model types it knows do not have), named with what it can model.
    """
    paths = _module_targets(model, config, skip)
    other = [p for p in paths if not is_linear(model.get_submodule(p)) and not isinstance(model.get_submodule(p), nn.Embedding)]
    if other:
        raise ConfigError(
            f"the memory estimator models LoRA on linear layers, embeddings, expert parameters and trainable tokens, "
            f"not {other[0]} ({type(model.get_submodule(other[0])).__name__}); estimate without it, or measure with "
            f"peftlab bench"
        )
    return {path: config.rank_and_alpha(path)[0] for path in paths if is_linear(model.get_submodule(path))}


def extra_lora(model: nn.Module, config, counts) -> list[int]:
    """The adapter tensors that are not per linear: expert parameters (:func:`parameter_lora`), embedding LoRA
    (A (r, V), B (d, r)) and trainable token rows (k, d); notes the embedding ones in ``counts.notes`` for
    :func:`embedding_saved` / :func:`head_saved`."""
    sizes = parameter_lora(model, config, counts)
    notes = counts.notes.setdefault(NOTES, {"embeddings": [], "tokens": []})
    for path in _module_targets(model, config, []):
        module = model.get_submodule(path)
        if isinstance(module, nn.Embedding):
            check_embedding_config(config, path)  # what wrap accepts (no DoRA there)
            r = config.rank_and_alpha(path)[0]
            sizes += [r * module.num_embeddings, module.embedding_dim * r]
            counts.late_numels += r * (module.num_embeddings + module.embedding_dim)
            notes["embeddings"].append((path, r))
    if getattr(config, "trainable_token_indices", None):
        for path, indices in token_targets(model, config.trainable_token_indices, ()).items():
            k, d = len(indices), model.get_submodule(path).embedding_dim
            tied = bool(tied_modules(model, path))
            sizes.append(k * d)
            counts.late_numels += 0 if tied else k * d  # a tied head's rows get their gradient at the loss
            notes["tokens"].append((path, k, d, tied))
    return sizes


def embedding_saved(graph, counts, rows) -> bool:
    """Embedding LoRA: Aᵀ[x] (M, r) in the adapter dtype; trainable tokens: the clamped index (M, int64) and the
    in-I mask (M, bool). Returns whether any embedding of the notes is adapted."""
    notes = counts.notes.get(NOTES) or {}
    for path, r in notes.get("embeddings", []):
        graph.save(f"{path}.lora_rows", rows(path) * r * graph.a)
    for path, _, _, _ in notes.get("tokens", []):
        graph.save(f"{path}.token_index", rows(path) * 8)
        graph.save(f"{path}.token_mask", rows(path))
    return bool(notes.get("embeddings") or notes.get("tokens"))


def head_saved(graph, counts, x: str, rows) -> None:
    """A head tied to trainable tokens computes x (T − E[I])ᵀ and adds it at columns I (``index_add``): it saves
    x (M, d), T − E[I] (k, d), the index I (k, int64) and the added (M, k) logits (index_add keeps its source)."""
    for path, k, d, tied in (counts.notes.get(NOTES) or {}).get("tokens", []):
        if tied:
            graph.save(x, rows(path) * d * graph.e)
            graph.save(f"{path}.token_diff", k * d * graph.a)
            graph.save(f"{path}.token_ids", k * 8)
            graph.save(f"{path}.token_logits", rows(path) * k * graph.e)


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


_COMMON = dict(
    adapted_linears=adapted_linears, trains_base=trains_base, quantized_base=True, extra_params=extra_lora,
    embedding_saved=embedding_saved, head_saved=head_saved,
)
DORA_RULES = EstimateRules(linear_params=dora_linear_params, linear_saved=dora_linear_saved, **_COMMON)
RULES = EstimateRules(
    linear_params=linear_params,
    linear_saved=linear_saved,
    for_config=lambda config: DORA_RULES if config.use_dora else RULES,
    **_COMMON,
)
