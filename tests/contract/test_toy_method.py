"""A method defined in this file alone gets the whole generic API: wrap, several adapters, merge, disable,
save/load, mixed batches, combine. It touches nothing in peftlab: one config class, one slot class, one
``inject`` and a :class:`~peftlab.core.registry.Method` entry (the contract table), registered for the test.

The toy: a dense additive update per linear layer, ``h = W x + b + w · D x`` with D (d_out, d_in) = 0 at
init, so ΔW = D.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from contract_checks import CHECKS, FAMILIES, inputs, out, wrapped
from torch import nn

import peftlab
from helpers import perturb
from peftlab.core.config import PeftConfig
from peftlab.core.layer import Slot, layer_dims, weight_shape
from peftlab.core.registry import Injected, Method, register_method, registered_methods, unregister_method
from peftlab.core.state import base_layer_of
from peftlab.core.targeting import resolve_targets


@dataclass
class ToyConfig(PeftConfig):
    method = "toy"
    init_scale: float = 0.0


class ToySlot(Slot):
    roles = ("toy_delta",)
    method = "toy"

    def contribute(self, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        delta = self.tensor("toy_delta")
        return result + weight * (x.to(delta.dtype) @ delta.t()).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.tensor("toy_delta").float()


def inject_toy(model: nn.Module, config: ToyConfig, txn) -> Injected:
    targets = resolve_targets(model, config.target_modules or "all-linear", skip=txn.skip)
    shapes = {}
    for path in targets:
        base = base_layer_of(model.get_submodule(path))
        d_in, d_out = layer_dims(base)
        shapes[path] = weight_shape(base)
        delta = nn.Parameter(torch.full((d_out, d_in), config.init_scale))
        txn.add_slot(path, lambda layer: ToySlot(layer, config.adapter_name), {"toy_delta": delta})
    return Injected(targets=targets, shapes=shapes)


TOY = Method(
    name="toy",
    config_class=ToyConfig,
    inject=inject_toy,
    examples=lambda name, r: {"toy": ToyConfig(adapter_name=name)},
)


@pytest.fixture(autouse=True)
def toy_registered():
    register_method(TOY)
    yield
    unregister_method("toy")


def make(name: str, r: int) -> ToyConfig:
    return TOY.examples(name, r)["toy"]


def test_registered_like_any_method():
    assert TOY in registered_methods()
    with pytest.raises(peftlab.ConfigError, match="already registered"):
        register_method(TOY)
    assert peftlab.PeftConfig.from_dict(make("x", 4).to_dict()) == make("x", 4)


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("family", FAMILIES)
def test_toy_keeps_the_contract(check, family, tmp_path):
    CHECKS[check](make, family, tmp_path)


def test_toy_in_a_mixed_batch_and_combined():
    family = "llama"
    model = wrapped(make, family, names=("a", "b"))
    perturb(model, 0.2)
    model.eval()
    alone = {}
    for name in ("a", "b"):
        peftlab.set_active_adapters(model, name)
        alone[name] = out(model, family)
    with torch.no_grad():
        mixed = model(**inputs(family), adapter_names=["b", "a"]).logits
    torch.testing.assert_close(mixed[0], alone["b"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], alone["a"][1], rtol=1e-5, atol=1e-6)
    # not a low-rank product: stacking is refused with the reason, the exact SVD combination works
    with pytest.raises(peftlab.ConfigError, match="not a plain low-rank product"):
        peftlab.combine(model, ["a", "b"], [1.0, 1.0], how="cat")
    peftlab.combine(model, ["a", "b"], [0.5, 0.5], how="svd", rank=64, new_name="ab")
    peftlab.set_active_adapters(model, ["a", "b"], weights=[0.5, 0.5])
    both = out(model, family)
    peftlab.set_active_adapters(model, "ab")
    torch.testing.assert_close(out(model, family), both, rtol=1e-4, atol=1e-4)
