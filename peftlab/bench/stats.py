r"""Statistics for benchmark reports: intervals over seeds and paired bootstraps over test examples.

Two sources of noise sit in every benchmark number:

* **training noise** (seed: initialisation, data order, dropout), seen as the spread over seeds;
* **test-set sampling**: 872 SST-2 sentences measure an accuracy with a standard error of
  √(p(1-p)/n) ≈ 1.1 points at p = 0.87.

A row's interval (:func:`seed_interval`) is Student's t over the seed means,
``mean ± t_{0.975, m-1} · s / √m``; it needs m ≥ 2 seeds.

A difference between two methods (:func:`paired_bootstrap`) is measured on the *same* test examples,
so most of the test-sampling noise cancels: each of ``n_boot`` replicates draws n test examples with
replacement (one draw shared by both methods: paired) and, independently for each method, its m seeds
with replacement; the replicate's Δ is mean-over-drawn-seeds of the metric on the drawn examples of A
minus the same for B. The 95% interval is the 2.5/97.5 percentiles of the replicates; a difference is
*resolved* when the interval excludes 0. With one seed per method only test sampling is covered.
(Drawing m = 3 seeds with replacement understates the seed part of the variance by (m-1)/m.)

Per-example columns (what :meth:`peftlab.bench.tasks.Task.evaluate` stores in ``test_examples``):
``correct`` (0/1) for accuracy and exact match, ``tp``/``n_pred``/``n_ref`` for entity F1 = 2·Σtp / (Σn_pred + Σn_ref).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# two-sided 95% quantiles of Student's t, df = 1..30 (t_{0.975, df})
_T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]  # fmt: skip

COLUMNS = {"accuracy": ("correct",), "exact_match": ("correct",), "f1": ("tp", "n_pred", "n_ref")}
#: metrics that are a share of correct examples (exact match: of greedy answers equal to the reference)
SHARES = ("accuracy", "exact_match")


def t975(df: int) -> float:
    """t_{0.975, df}: exact table for df ≤ 30, then 1.96 + 2.4/df (error < 0.002 for df > 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= 30 else 1.96 + 2.4 / df


@dataclass(frozen=True)
class Interval:
    """A point estimate with a 95% interval [lo, hi]; ``n``: seeds (or replicates) behind it."""

    mean: float
    lo: float
    hi: float
    std: float = 0.0
    n: int = 1

    @property
    def resolved(self) -> bool:
        """True when the interval excludes 0 (the sign of a difference is supported by the data)."""
        return self.lo > 0 or self.hi < 0

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def seed_interval(values: Sequence[float]) -> Interval:
    """Mean, sample std and the t interval of the mean over seeds (needs ≥ 2 values for an interval).

    One value gives a degenerate interval [x, x] with std 0.
    """
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean, 0.0, 1)
    std = float(x.std(ddof=1))
    half = t975(x.size - 1) * std / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, std, int(x.size))


def example_matrix(examples: dict, metric: str) -> np.ndarray:
    """The per-example columns of one run as an (n, k) float array, k = 1 (accuracy) or 3 (F1)."""
    if metric not in COLUMNS:
        raise ValueError(f"no per-example statistic for metric {metric!r}; known: {sorted(COLUMNS)}")
    missing = [c for c in COLUMNS[metric] if c not in (examples or {})]
    if missing:
        raise ValueError(
            f"the run record has no per-example column(s) {missing} (recorded before they were kept?)"
        )
    return np.stack([np.asarray(examples[c], dtype=float) for c in COLUMNS[metric]], axis=1)


def metric_from_sums(sums: np.ndarray, metric: str, n: int) -> np.ndarray:
    """Corpus metric from summed columns (..., k): accuracy = Σcorrect / n, F1 = 2Σtp / (Σn_pred + Σn_ref)."""
    if metric in SHARES:
        return sums[..., 0] / n
    denominator = sums[..., 1] + sums[..., 2]
    return np.where(denominator > 0, 2 * sums[..., 0] / np.maximum(denominator, 1e-12), 0.0)


def corpus_metric(examples: dict, metric: str) -> float:
    """The metric of one run recomputed from its per-example columns (equals the recorded test metric)."""
    m = example_matrix(examples, metric)
    return float(metric_from_sums(m.sum(0), metric, len(m)))


def _replicate_metrics(runs: list[np.ndarray], weights: np.ndarray, metric: str, n: int) -> np.ndarray:
    """(B, runs): each run's metric under each replicate's example weights (B, n)."""
    return np.stack([metric_from_sums(weights @ m, metric, n) for m in runs], axis=1)


def paired_bootstrap(
    a: list[dict],
    b: list[dict],
    metric: str,
    n_boot: int = 2000,
    seed: int = 0,
    resample_seeds: bool = True,
) -> Interval:
    """Δ = mean metric of runs ``a`` − mean metric of runs ``b`` on the same test examples, with a 95%
    paired-bootstrap interval (module docstring). ``a``/``b``: the runs' ``test_examples`` dicts.

    Returns an :class:`Interval` in the metric's units (fractions); ``mean`` is the Δ on the full data.
    """
    if not a or not b:
        raise ValueError("need at least one run on each side")
    runs_a = [example_matrix(e, metric) for e in a]
    runs_b = [example_matrix(e, metric) for e in b]
    sizes = {len(m) for m in runs_a + runs_b}
    if len(sizes) != 1:
        raise ValueError(f"runs were scored on test sets of different sizes {sorted(sizes)}: not paired")
    n = sizes.pop()
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_boot)
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))  # bound the (chunk, n) weight matrix
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(float)  # resampled examples
        sides = []
        for runs in (runs_a, runs_b):
            values = _replicate_metrics(runs, weights, metric, n)  # (size, m)
            m = values.shape[1]
            if resample_seeds and m > 1:
                pick = rng.integers(0, m, size=(size, m))
                values = np.take_along_axis(values, pick, axis=1)
            sides.append(values.mean(1))
        deltas[start : start + size] = sides[0] - sides[1]
    point = float(
        np.mean([corpus_metric(e, metric) for e in a]) - np.mean([corpus_metric(e, metric) for e in b])
    )
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return Interval(point, float(lo), float(hi), float(deltas.std(ddof=1)), n_boot)


def target_status(delta: Interval, margin: float) -> str:
    """Whether Δ ≥ -margin ("within margin of the reference") is met, missed or not resolved.

    ``met``: the whole interval lies above -margin; ``missed``: all of it lies below; else ``undecided``.
    """
    if delta.lo >= -margin:
        return "met"
    if delta.hi < -margin:
        return "missed"
    return "undecided"


def chance_threshold(chance: float, n: int, metric: str) -> float:
    """A dev metric at or below this has not left chance level: chance + 3 binomial standard errors
    (accuracy, chance = the majority class's share), or 0.05 for F1 (chance is 0 there)."""
    if metric in SHARES:
        return chance + 3 * math.sqrt(max(chance * (1 - chance), 1e-12) / max(n, 1))
    return 0.05
