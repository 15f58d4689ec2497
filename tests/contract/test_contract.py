"""Every method the registry knows, with every example config it gives (its variants too), on every tiny
model family, through every check of :mod:`contract_checks`. A new method gets all of them by registering a
:class:`~peftlab.core.registry.Method` with ``examples``; nothing here names a method."""

from __future__ import annotations

import pytest
import torch
from contract_checks import CHECKS, FAMILIES, out, wrapped

import peftlab
from helpers import perturb, tiny_model
from peftlab.core.registry import registered_methods

EXAMPLES = {label: (lambda name, r, m=m, label=label: m.examples(name, r)[label])
            for m in registered_methods() if m.examples is not None for label in m.examples("a", 4)}
CASES = [(label, family) for label in EXAMPLES for family in FAMILIES]


def test_every_registered_method_has_examples():
    missing = [m.name for m in registered_methods() if m.examples is None]
    assert not missing, f"methods without example configs (the contract suite cannot check them): {missing}"
    assert {"lora", "dora", "pissa", "adalora", "houlsby", "pfeiffer", "parallel", "prefix"} <= set(EXAMPLES)


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("label,family", CASES)
def test_contract(check, label, family, tmp_path):
    CHECKS[check](EXAMPLES[label], family, tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_weighted_lora_combination_is_sum_of_updates(family):
    base = tiny_model(family)
    model = wrapped(EXAMPLES["lora"], family, names=("a", "b"))
    perturb(model, 0.2)
    peftlab.set_active_adapters(model, ["a", "b"], weights=[0.5, -1.5])
    both = out(model, family)
    peftlab.merge(model)  # merges each active adapter with its weight
    torch.testing.assert_close(out(model, family), both, rtol=1e-4, atol=1e-5)
    peftlab.unmerge(model)
    plain = peftlab.unwrap(model)
    for (n, p), (_, q) in zip(plain.named_parameters(), base.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
