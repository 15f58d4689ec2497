"""``modules_to_save``: a trained copy of a whole module (typically a new classification head) per adapter.

The original module stays frozen as the wrapper's ``base_layer``; each adapter that lists it gets
its own trainable deep copy in the wrapper's ``modules_to_save`` dict
(``classifier.modules_to_save.<name>.weight``), so two adapters with two task heads save, load and
switch independently. While the adapter runs, its copy computes the module's whole output
(``replaces_base``); disabled or inactive, the original module runs. HF PEFT's
``ModulesToSaveWrapper`` does the same; in its files the copy's tensors are keyed like the
original module's (``classifier.weight``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .layer import AdapterLayer, Slot

ROLE = "modules_to_save"


class ModuleCopySlot(Slot):
    """A full trainable copy of the wrapped module; replaces its output while active."""

    roles = (ROLE,)
    mergeable = False
    replaces_base = True
    method = "modules_to_save"

    def contribute(self, x: torch.Tensor, result, weight: float, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.tensor(ROLE)(x, *args, **kwargs)

    def merged(self, weight_matrix, weight):  # never called: mergeable is False
        raise NotImplementedError

    def describe(self) -> str:
        return type(self.tensor(ROLE)).__name__


def add_head_copies(txn, paths: list[str]) -> list[str]:
    """Give the adapter of ``txn`` a trainable copy of each module in ``paths``; returns ``paths``."""
    for path in paths:
        module = txn.model.get_submodule(path)
        original = module.base_layer if isinstance(module, AdapterLayer) else module
        clone = copy.deepcopy(original)
        for p in clone.parameters():
            p.requires_grad_(True)
        txn.add_slot(path, lambda layer: ModuleCopySlot(layer, txn.config.adapter_name), {ROLE: clone})
    return list(paths)
