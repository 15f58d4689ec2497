r"""Combine several LoRA / AdaLoRA adapters of one model into a new LoRA adapter.

With adapters i = 1..n, weights wᵢ and per-layer updates ΔWᵢ = sᵢ Bᵢ Aᵢ (AdaLoRA: sᵢ Pᵢ (Λᵢ Qᵢ)):

* ``cat``: exact. A = [A₁; …; Aₙ] (Σrᵢ × d_in), B = [w₁s₁B₁ | … | wₙsₙBₙ] (d_out × Σrᵢ), s = 1, so
  B A = Σ wᵢ ΔWᵢ.
* ``linear``: exactly Σ wᵢ ΔWᵢ, for adapters of equal rank (stored as ``cat`` does, rank n·r).
  HF PEFT's ``linear`` instead averages A and B separately with √wᵢ, so its B A carries cross terms
  Bᵢ Aⱼ (i ≠ j) and is not Σ wᵢ ΔWᵢ (peft issue #3004); ``svd`` with ``rank=r`` gives the best
  rank-r approximation of the exact sum.
* ``svd``: the best rank-k approximation (Eckart–Young) of Σ wᵢ ΔWᵢ: ΔW = U S Vᵀ, B = U_k S_k,
  A = V_kᵀ, s = 1; its error ‖ΔW − BA‖_F equals the norm of the discarded singular values.
* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the task-arithmetic merges of
  TIES (Yadav et al., 2023: trim to ``density`` by magnitude, elect the sign by total mass, mean of
  the agreeing entries), DARE (Yu et al., 2023: drop entries with probability 1 − density and
  rescale by 1/density, seeded, unbiased) and magnitude pruning, applied to the dense wᵢ ΔWᵢ and
  followed by SVD back to rank k, as HF PEFT's ``*_svd`` modes.

Everything is computed in fp32 (so bf16 and fp16 models work; HF PEFT's SVD fails in half
precision, peft #1353) and the result is cast to the adapter dtype. Bottleneck adapters and
prefixes are not linear in their weights, so they cannot be combined.

LoRA on parameters (``target_parameters``: MoE expert stacks, a router's weight) combines per expert with the same
rules: ΔW_e = Σ wᵢ sᵢ B_ie A_ie (``cat``/``linear``: the per-expert factors stacked, exact; the SVD modes: each
expert's best rank-k approximation of the combined (E, d_out, d_in) stack, trim and drop taken over the whole
stack). HF PEFT 0.21's ``add_weighted_adapter`` refuses adapters with ``target_parameters``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from ..api import delete_adapter, wrap
from ..core.activation import active_adapters, check_weights, set_active_adapters
from ..core.config import check_adapter_name, check_int, check_number
from ..core.merging import merged_weights
from ..core.registry import get_method
from ..core.state import adapters, get_state, slots_of, wrapped_layers
from ..core.tensors import adapter_tensors, load_adapter_tensors
from ..methods.lora.config import LoraConfig
from ..util.errors import ConfigError, WrapError

MODES = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def combine(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float],
    how: str = "cat",
    new_name: str = "combined",
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
) -> str:
    """Write a new LoRA adapter ``new_name`` that combines ``names`` (see the module docstring).

    Args:
        names, weights: the adapters and one weight each.
        how: one of :data:`MODES`.
        rank: k for the SVD modes, an integer ≥ 1 (default: the largest input rank).
        density: fraction of entries kept, in (0, 1], for ties/dare/magnitude_prune (required there).
        seed: seeds DARE's random drop (reproducible), an integer ≥ 0.

    All or nothing: every argument is checked first (weights: a list of finite numbers, one per name); if
    anything fails the model is left as it was. Merged adapters stay merged.

    Returns the new adapter's name. The model's active adapters and their weights do not change; the new adapter is
    frozen (activate or train it with :func:`peftlab.set_active_adapters`).
    """
    names, weights = _check_inputs(model, names, weights, how, new_name, rank, density, seed)
    _validate(model, names, weights, how, new_name, density)
    slot_maps = [_target_slots(model, n) for n in names]
    targets = [p for p, slot in slot_maps[0].items() if not slot.params]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for path, slot in slot_maps[0].items():
        for param in slot.params:  # expert stacks / router weights (target_parameters): per-expert factors
            slots = [m[path] for m in slot_maps]
            a, b = _combine_param(slots, param, weights, how, rank, density, gen)
            tensors.update({f"{path}.{k}": v for k, v in slot.param_tensors(param, a, b).items()})
            ranks[f"{path}.{param}"] = a.shape[1]
    for path in targets:
        slots = [m[path] for m in slot_maps]
        if how in ("cat", "linear"):
            factors = [s.low_rank_factors() for s in slots]
            a = torch.cat([f[0].detach().float() for f in factors], dim=0)
            b = torch.cat([w * f[2] * f[1].detach().float() for f, w in zip(factors, weights)], dim=1)
        else:
            deltas = [s.delta_weight().detach().float() for s in slots]
            merged = combine_deltas(deltas, weights, how, density, gen)
            k = min(rank or max(slot_rank(s) for s in slots), min(merged.shape))
            a, b = best_rank_k_factors(merged, k)
        tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"] = a, b
        ranks[path] = a.shape[0]
    r = max(ranks.values())
    pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
    parameters = [p for p in ranks if p not in targets]
    config = LoraConfig(
        r=r,
        alpha=float(r),  # s = alpha / r = 1: the scale lives in B
        target_modules=targets or None,  # None with target_parameters: the parameters alone
        target_parameters=parameters or None,
        rank_pattern=pattern,
        alpha_pattern={p: float(k) for p, k in pattern.items()},
        adapter_name=new_name,
    )
    _attach(model, config, tensors)
    return new_name


def _combine_param(slots, param: str, weights, how, rank, density, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert factors (A (E, k, d_in), B (E, d_out, k)) of the combination of base parameter ``param``'s
    updates s_i·B_ie A_ie: stacked for ``cat``/``linear`` (exact), else the modes' dense combination of the
    (E, d_out, d_in) updates (trim and drop over the whole stack) and each expert's best rank-k SVD."""
    factors = [s.param_low_rank_factors(param) for s in slots]
    if how in ("cat", "linear"):
        a = torch.cat([f[0].detach().float() for f in factors], dim=1)
        b = torch.cat([w * f[2] * f[1].detach().float() for f, w in zip(factors, weights)], dim=2)
        return a, b
    deltas = [f[2] * torch.bmm(f[1].detach().float(), f[0].detach().float()) for f in factors]
    merged = combine_deltas(deltas, weights, how, density, gen)
    k = min(rank or max(f[0].shape[1] for f in factors), min(merged.shape[1:]))
    return best_rank_k_factors(merged, k)


def _attach(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Add the combined adapter frozen and inactive; the active set, weights and merges stay as they were.
    On any failure the model is left as it was."""
    active = active_adapters(model)
    weights = [merged_weights(model).get(n, _weight(model, n)) for n in active]
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    wrap(model, config)
    try:
        load_adapter_tensors(model, tensors, config.adapter_name)
        set_active_adapters(model, active, weights)
        params = dict(model.named_parameters())
        for n, flag in grads.items():
            if n in params:
                params[n].requires_grad_(flag)
        for tensor in adapter_tensors(model, config.adapter_name).values():
            if isinstance(tensor, nn.Parameter) and tensor.is_floating_point():
                tensor.requires_grad_(False)
    except BaseException:
        delete_adapter(model, config.adapter_name, force=True)
        set_active_adapters(model, active, weights)
        raise


def _weight(model: nn.Module, name: str) -> float:
    for _, layer in wrapped_layers(model, name):
        if name in layer.weights:
            return layer.weights[name]
    return 1.0


def _check_inputs(model, names, weights, how, new_name, rank, density, seed) -> tuple[list[str], list[float]]:
    """Types and ranges of combine()'s arguments, each error naming the argument and its valid form."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"combine() names must be a list of adapter names, e.g. ['a', 'b'], got {names!r}")
    if not isinstance(how, str):
        raise ConfigError(f"combine() how must be one of {', '.join(MODES)}, got {how!r}")
    check_adapter_name(new_name)
    if rank is not None:
        check_int("combine()", "rank", rank, low=1)
    if density is not None:
        check_number("combine()", "density", density, low=0, high=1, low_open=True)
    if seed is not None:
        check_int("combine()", "seed", seed, low=0)
    return list(names), check_weights(weights, len(names))


def _target_slots(model: nn.Module, name: str) -> dict:
    """{path: slot} of the adapter's targets (its ``modules_to_save`` head copies are not combined)."""
    targets = set(adapters(model)[name].targets)
    return {path: slot for path, slot in slots_of(model, name).items() if path in targets}


def slot_rank(slot) -> int:
    if slot.params:
        return max(slot.param_low_rank_factors(p)[0].shape[1] for p in slot.params)
    factors = slot.low_rank_factors()
    return factors[0].shape[0] if factors is not None else min(slot.delta_weight().shape)


def best_rank_k_factors(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (V_kᵀ, U_k S_k) of the fp32 SVD of ``delta`` (d_out, d_in): B A is the best rank-k approximation.
    A stack (E, d_out, d_in) gives each expert's: A (E, k, d_in), B (E, d_out, k)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return vh[..., :k, :], u[..., :k] * s[..., None, :k]


def combine_deltas(
    deltas: list[torch.Tensor],
    weights: Sequence[float],
    how: str,
    density: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The merged dense update of the SVD modes, from per-adapter ΔWᵢ (each already scaled by sᵢ).

    ``svd``: Σ wᵢ ΔWᵢ. ``magnitude_prune``: Σ wᵢ trim(ΔWᵢ). ``dare_linear``: Σ wᵢ drop(ΔWᵢ).
    ``ties`` / ``dare_ties``: trim (or drop); elect each entry's sign as the sign of the sum of the
    trimmed ΔWᵢ; then Σ of the weighted entries that agree with it, divided by their count.
    """
    w = torch.tensor(list(weights), dtype=torch.float32).view(-1, *([1] * deltas[0].dim()))
    stack = torch.stack([d.float() for d in deltas])
    if how == "svd":
        return (w * stack).sum(0)
    if how in ("ties", "magnitude_prune"):
        stack = torch.stack([trim(d, density) for d in stack])
    elif how in ("dare_linear", "dare_ties"):
        stack = torch.stack([drop(d, density, generator) for d in stack])
    weighted = w * stack
    if how in ("magnitude_prune", "dare_linear"):
        return weighted.sum(0)
    # TIES: the sign is elected on the trimmed task vectors (before weighting), as in the paper
    elected = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = stack.sign() == elected
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·numel) entries of largest magnitude, zero the rest."""
    k = int(density * delta.numel())
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[delta.abs().reshape(-1).topk(k).indices] = True
    return delta * keep.view(delta.shape)


def drop(delta: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by 1/density (unbiased)."""
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta * keep / density


def _validate(model, names, weights, how, new_name, density) -> None:
    states = adapters(model)
    if not states:
        get_state(model)
    if how not in MODES:
        raise ConfigError(f"unknown combination how={how!r}; valid: {', '.join(MODES)}")
    if not names:
        raise ConfigError("combine() needs at least one adapter name")
    unknown = [n for n in names if n not in states]
    if unknown:
        raise WrapError(f"unknown adapter name(s) {unknown}; this model has: {', '.join(states)}")
    if len(weights) != len(names):
        raise ConfigError(f"got {len(weights)} weights for {len(names)} adapters; give one weight per adapter")
    if new_name in states:
        raise WrapError(f"an adapter named {new_name!r} already exists; pick another new_name")
    methods = {n: states[n].config.method for n in names}
    stacked = how in ("cat", "linear")
    for n in names:
        if not get_method(methods[n]).folds_into_base or not states[n].targets:
            raise ConfigError(
                f"cannot combine adapter {n!r} ({methods[n]}): it does not live in the layers' weights (e.g. a prefix), "
                f"so a weighted sum of its tensors is not a sum of effects; LoRA-family adapters combine"
            )
        for path, slot in _target_slots(model, n).items():
            if not slot.combinable:
                raise ConfigError(
                    f"cannot combine adapter {n!r}: its {type(slot).__name__} on {path} is not a LoRA that combine can "
                    f"rebuild from ΔW (a convolution's kernel-shaped update, or trainable token rows); merge it, or "
                    f"combine adapters without it"
                )
            if slot.params:
                if any(slot.param_low_rank_factors(p) is None for p in slot.params):
                    raise ConfigError(
                        f"cannot combine adapter {n!r}: its {type(slot).__name__} on {path} adapts parameters "
                        f"({', '.join(slot.params)}) in a way combine cannot rebuild (expert stacks and router weights "
                        f"of target_parameters combine); merge it, or combine adapters without it"
                    )
                continue
            if stacked and slot.low_rank_factors() is None:
                raise ConfigError(
                    f"how={how!r} stacks low-rank factors, but adapter {n!r} ({methods[n]}, {type(slot).__name__} on "
                    f"{path}) is not a plain low-rank product s·B A"
                    + ("; use how='svd' (built from each exact ΔW)" if slot.mergeable else
                       ": bottleneck adapters and prefixes are not linear in their weights, so they cannot be combined")
                )
            if not slot.mergeable:
                raise ConfigError(
                    f"cannot combine adapter {n!r} ({methods[n]}): {type(slot).__name__} is not linear in its weights, "
                    f"so a weighted sum of weights is not a sum of effects; LoRA-family adapters combine"
                )
    if len(set(methods.values())) > 1:
        raise ConfigError(f"cannot combine adapters of different methods: {methods}; combine one method at a time")
    target_sets = {n: set(states[n].targets) for n in names}
    target_sets = {n: t | {f"{p}.{q}" for p, s in _target_slots(model, n).items() for q in s.params}
                   for n, t in target_sets.items()}
    first = names[0]
    for n in names[1:]:
        if target_sets[n] != target_sets[first]:
            diff = sorted(target_sets[n] ^ target_sets[first])
            raise ConfigError(
                f"adapters {first!r} and {n!r} adapt different modules (e.g. {diff[:3]}); combine needs the same targets"
            )
    if how == "linear":
        ranks = {n: sorted({slot_rank(s) for s in _target_slots(model, n).values()}) for n in names}
        if len({tuple(r) for r in ranks.values()}) > 1:
            raise ConfigError(
                f"how='linear' needs adapters of equal rank, got {ranks}; use how='cat' (exact, ranks add) or "
                f"how='svd' (best rank-k approximation)"
            )
    if how in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        if density is None or not 0 < density <= 1:
            raise ConfigError(f"how={how!r} needs density in (0, 1], got {density!r}")
