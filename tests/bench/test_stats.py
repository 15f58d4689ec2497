"""The report's statistics: t intervals over seeds and paired bootstraps over test examples."""

import math

import numpy as np
import pytest

from peftlab.bench.metrics import entity_f1
from peftlab.bench.stats import (
    chance_threshold,
    corpus_metric,
    paired_bootstrap,
    seed_interval,
    t975,
    target_status,
)


def acc_run(correct) -> dict:
    return {"correct": [int(c) for c in correct]}


def test_t_quantiles_and_seed_interval_match_textbook_values():
    assert t975(2) == pytest.approx(4.303, abs=1e-3)
    assert t975(1000) == pytest.approx(1.962, abs=2e-3)
    iv = seed_interval([0.80, 0.82, 0.84])  # mean 0.82, s = 0.02
    assert iv.mean == pytest.approx(0.82)
    assert iv.std == pytest.approx(0.02)
    assert iv.half_width == pytest.approx(4.303 * 0.02 / math.sqrt(3), rel=1e-3)
    one = seed_interval([0.7])
    assert (one.lo, one.hi, one.std, one.n) == (0.7, 0.7, 0.0, 1)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t975(0)


def test_paired_bootstrap_known_answer():
    """A right on every example, B wrong on exactly 20% of them: the per-example differences are
    Bernoulli(0.2), so the bootstrap distribution of Δ is Binomial(n, 0.2)/n: sd √(0.2·0.8/n)."""
    n = 1000
    b = np.ones(n, dtype=int)
    b[::5] = 0
    delta = paired_bootstrap([acc_run(np.ones(n))], [acc_run(b)], "accuracy", n_boot=4000, seed=1)
    sd = math.sqrt(0.2 * 0.8 / n)
    assert delta.mean == pytest.approx(0.2)
    assert delta.std == pytest.approx(sd, rel=0.08)
    assert delta.lo == pytest.approx(0.2 - 1.96 * sd, abs=0.004)
    assert delta.hi == pytest.approx(0.2 + 1.96 * sd, abs=0.004)
    assert delta.resolved


def test_pairing_cancels_shared_errors():
    """Two runs that agree on all but 4 of 872 examples: paired, the interval is narrow (±~0.5 pt)
    although each accuracy alone has a standard error of ~1.4 points, and the difference is unresolved."""
    rng = np.random.default_rng(0)
    a = (rng.random(872) < 0.8).astype(int)
    b = a.copy()
    flip = np.flatnonzero(a == 1)[:2].tolist() + np.flatnonzero(a == 0)[:2].tolist()
    b[flip] = 1 - b[flip]
    delta = paired_bootstrap([acc_run(a)], [acc_run(b)], "accuracy", n_boot=2000)
    assert delta.mean == pytest.approx(0.0)
    assert delta.hi - delta.lo < 0.01
    assert not delta.resolved
    same = paired_bootstrap([acc_run(a)], [acc_run(a)], "accuracy", n_boot=200)
    assert (same.lo, same.hi) == (0.0, 0.0)


def test_bootstrap_interval_covers_the_true_difference_about_95_percent_of_the_time():
    """Coverage sanity: 150 synthetic test sets drawn from a population where A is right with p=0.85 and
    B with p=0.80 (correlated: B's errors mostly shared); the 95% interval should hold Δ = 0.05 in
    roughly 95% of them (binomial noise on 150 trials: accept 88%..99%)."""
    rng = np.random.default_rng(123)
    n, hits, trials = 400, 0, 150
    for t in range(trials):
        u = rng.random(n)
        a, b = (u < 0.85).astype(int), (u < 0.80).astype(int)  # Δ = 0.05 exactly in the population
        delta = paired_bootstrap([acc_run(a)], [acc_run(b)], "accuracy", n_boot=400, seed=t)
        hits += delta.lo <= 0.05 <= delta.hi
    assert 0.88 <= hits / trials <= 0.99


def test_seeds_widen_the_interval_and_average():
    """With several seeds per side, Δ is the difference of seed means, and seed-to-seed spread widens it."""
    rng = np.random.default_rng(3)
    base = (rng.random(500) < 0.85).astype(int)

    def variant(k):  # flip k examples of the base
        c = base.copy()
        idx = rng.choice(500, size=k, replace=False)
        c[idx] = 1 - c[idx]
        return acc_run(c)

    a = [variant(5), variant(30), variant(60)]
    b = [acc_run(base)]
    delta = paired_bootstrap(a, b, "accuracy", n_boot=1000)
    expected = np.mean([corpus_metric(r, "accuracy") for r in a]) - corpus_metric(b[0], "accuracy")
    assert delta.mean == pytest.approx(expected)
    narrow = paired_bootstrap(a, b, "accuracy", n_boot=1000, resample_seeds=False)
    assert delta.hi - delta.lo > narrow.hi - narrow.lo


def test_entity_f1_from_per_sentence_counts_equals_the_corpus_metric():
    preds = [["B-PER", "I-PER", "O"], ["B-LOC", "O"], ["O", "B-ORG"]]
    refs = [["B-PER", "I-PER", "O"], ["B-ORG", "O"], ["O", "O"]]
    from peftlab.bench.metrics import entities

    cols = {"tp": [], "n_pred": [], "n_ref": []}
    for p, r in zip(preds, refs):
        ep, er = entities(p), entities(r)
        cols["tp"].append(len(ep & er))
        cols["n_pred"].append(len(ep))
        cols["n_ref"].append(len(er))
    assert corpus_metric(cols, "f1") == pytest.approx(entity_f1(preds, refs)["f1"])
    delta = paired_bootstrap([cols], [cols], "f1", n_boot=100)
    assert delta.mean == 0.0


def test_errors_and_target_status():
    with pytest.raises(ValueError, match="different sizes"):
        paired_bootstrap([acc_run([1, 0])], [acc_run([1, 0, 1])], "accuracy")
    with pytest.raises(ValueError, match="per-example column"):
        paired_bootstrap([{}], [acc_run([1])], "accuracy")
    from peftlab.bench.stats import Interval

    assert target_status(Interval(-0.002, -0.004, 0.001), 0.005) == "met"
    assert target_status(Interval(-0.02, -0.03, -0.01), 0.005) == "missed"
    assert target_status(Interval(-0.004, -0.012, 0.004), 0.005) == "undecided"
    # SST-2 dev of 300 with a 51% majority: 3 standard errors above chance is about 59.7%
    assert chance_threshold(0.51, 300, "accuracy") == pytest.approx(0.51 + 3 * math.sqrt(0.51 * 0.49 / 300))
