"""How the memory estimator counts AdaLoRA: Q (r, d_in), P (d_out, r) and λ (r,) per target at ``init_r``; its
forward saves x and x (Q⊙λ)ᵀ, and Q⊙λ itself when x requires grad."""

from __future__ import annotations

from torch import nn

from ...core.registry import EstimateRules
from ...core.targeting import resolve_targets


def adapted_linears(model: nn.Module, config, skip: list[str]) -> dict[str, int]:
    return {path: config.init_r for path in resolve_targets(model, config.target_modules, skip=skip)}


def linear_params(r: int, d_in: int, d_out: int) -> list[int]:
    return [r * d_in, d_out * r, r]


def linear_saved(graph, x: str, out: str, lin, m: int) -> None:
    e, a = graph.e, graph.a
    if graph.rg[x]:
        graph.save(out + ".AE", lin.r * lin.d_in * a)  # dX needs the product A⊙E
    graph.save(x if e == a else x + ".f32", m * lin.d_in * a)
    graph.save(out + ".xa", m * lin.r * a)
    graph.gemm += m * lin.d_out * e + m * lin.r * a + m * lin.d_out * a
    graph.rg[out] = True


RULES = EstimateRules(
    adapted_linears=adapted_linears, linear_params=linear_params, linear_saved=linear_saved, quantized_base=True
)
