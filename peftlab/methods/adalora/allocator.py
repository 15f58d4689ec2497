r"""AdaLoRA's budget schedule and importance-based rank allocation (Zhang et al., 2023, §3.2-3.3).

Sensitivity-smoothed importance of every adapter entry w (a P, Λ or Q element):

    I_t = |w · ∂L/∂w|
    Ī_t = β1 Ī_{t-1} + (1 - β1) I_t                   (sensitivity EMA)
    Ū_t = β2 Ū_{t-1} + (1 - β2) |I_t - Ī_t|           (uncertainty EMA, with the updated Ī_t)
    s(w) = Ī_t · Ū_t

Score of triplet i of a layer: S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij).

Budget (total number of unmasked triplets over all layers), b0 = init_r · n_layers,
b_T = target_r · n_layers, T = total_steps:

    b(t) = b0                                                      t < t_init
    b(t) = ⌊b_T + (b0 - b_T) (1 - (t - t_init) / (T - t_init - t_final))³⌋   otherwise, until
    b(t) = b_T                                                     t ≥ T - t_final

Masking (λ_i ← 0 for all but the b(t) highest-scoring triplets) happens every Δt steps in the
middle phase; masked triplets keep training and can come back. At t = T - t_final the final
mask is computed, and from then on it is fixed (re-applied every step).
"""

from __future__ import annotations

import torch


def budget(step: int, init_total: int, target_total: int, t_init: int, t_final: int, total_steps: int) -> int:
    """b(t) of the module docstring."""
    if step < t_init:
        return init_total
    if step >= total_steps - t_final:
        return target_total
    progress = (step - t_init) / (total_steps - t_init - t_final)
    return int(target_total + (init_total - target_total) * (1 - progress) ** 3)


class RankAllocator:
    """Keeps the importance EMAs of every AdaLoRA layer and masks Λ to the budget.

    Args:
        layers: {path: AdaLoraLinear}; config: the AdaLoraConfig (betas, schedule).
    """

    def __init__(self, layers: dict, config) -> None:
        self.layers = layers
        self.config = config
        self.ipt: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}
        self.final_pattern: dict[str, list[bool]] | None = None

    @property
    def init_total(self) -> int:
        return sum(layer.r for layer in self.layers.values())

    @property
    def target_total(self) -> int:
        return self.config.target_r * len(self.layers)

    def budget(self, step: int) -> int:
        c = self.config
        return budget(step, self.init_total, self.target_total, c.t_init, c.t_final, c.total_steps)

    @torch.no_grad()
    def update_importance(self) -> None:
        """One EMA update from the current gradients (call after backward)."""
        b1, b2 = self.config.beta1, self.config.beta2
        for path, layer in self.layers.items():
            for name in ("lora_A", "lora_B", "lora_E"):
                p = getattr(layer, name)
                if p.grad is None:
                    continue
                key = f"{path}.{name}"
                sensitivity = (p * p.grad).abs().float()
                if key not in self.ipt:
                    self.ipt[key] = torch.zeros_like(sensitivity)
                    self.unc[key] = torch.zeros_like(sensitivity)
                self.ipt[key].mul_(b1).add_(sensitivity, alpha=1 - b1)
                self.unc[key].mul_(b2).add_((sensitivity - self.ipt[key]).abs(), alpha=1 - b2)

    def element_score(self, path: str, layer, name: str) -> torch.Tensor:
        """s(w) = Ī · Ū for every entry of one adapter matrix (zeros before any update)."""
        key = f"{path}.{name}"
        if key not in self.ipt:
            return torch.zeros(getattr(layer, name).shape, device=getattr(layer, name).device)
        return self.ipt[key] * self.unc[key]

    def scores(self) -> dict[str, torch.Tensor]:
        """Triplet scores S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij), shape (r,), per layer."""
        return {
            path: self.element_score(path, layer, "lora_E").view(-1)
            + self.element_score(path, layer, "lora_A").mean(dim=1)
            + self.element_score(path, layer, "lora_B").mean(dim=0)
            for path, layer in self.layers.items()
        }

    @torch.no_grad()
    def mask_to_budget(self, total: int) -> dict[str, list[bool]]:
        """Keep exactly the ``total`` highest-scoring triplets; zero the other λ. Returns the pattern."""
        scores = self.scores()
        paths = list(scores)
        flat = torch.cat([scores[p].to("cpu") for p in paths])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, k=min(total, flat.numel())).indices] = True
        pattern, start = {}, 0
        for path in paths:
            r = scores[path].numel()
            pattern[path] = keep[start : start + r].tolist()
            start += r
        self.apply_pattern(pattern)
        return pattern

    @torch.no_grad()
    def apply_pattern(self, pattern: dict[str, list[bool]]) -> None:
        for path, keep in pattern.items():
            layer = self.layers[path]
            mask = torch.tensor(keep, device=layer.lora_E.device).view(-1, 1)
            layer.lora_E.masked_fill_(~mask, 0.0)

    def step(self, step: int) -> dict[str, list[bool]] | None:
        """The per-step call: update importances, mask on schedule; returns the final pattern once fixed."""
        c = self.config
        final_at = c.total_steps - c.t_final
        if step < final_at:
            self.update_importance()
            if step >= c.t_init and step % c.delta_t == 0:
                self.mask_to_budget(self.budget(step))
            return None
        if self.final_pattern is None:
            if step == final_at or not self.ipt:
                self.update_importance()
            self.final_pattern = self.mask_to_budget(self.target_total)
            self.ipt.clear()
            self.unc.clear()
        else:
            self.apply_pattern(self.final_pattern)
        return self.final_pattern
