r"""Trainable tokens (HF PEFT's ``trainable_token_indices`` / ``TrainableTokensLayer``): only chosen rows of an
embedding train, and only they are saved.

For token indices I = (i₁ … i_k) of an embedding E (V × d), the adapter holds their new rows T (k × d), initialised
to E[I], and the layer computes the embedding with those rows replaced::

    h(x) = (E with rows I set to T)[x] · γ = E[x]·γ + [x ∈ I] · (T − E[I])[pos(x)] · γ

(γ: the module's ``embed_scale``, as HF PEFT applies it). Only T trains and only T is saved (k·d numbers). A
module that shares E (an output head tied to the input embeddings, ``lm_head.weight is embed_tokens.weight``)
gets the same rows, as in HF PEFT: its logits for the tokens in I are x Tᵀ instead of x E[I]ᵀ. Merging writes T
into rows I of E (so the tied head follows; nothing else changes) and keeps E[I] to put back on unmerge, bit for
bit. The delta form above costs O(tokens · d) per forward, never a V × d copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core.layer import AdapterLayer, Slot
from ...core.structure import base_view, name_matches
from ...util.errors import ConfigError, MergeError
from .slot import adapter_tensor_kwargs

ROLE = "trainable_tokens_delta"  # HF PEFT's parameter name


class TokenRows:
    """The token indices of a trainable-tokens slot and their position lookup (per device)."""

    def __init__(self, indices: list[int]) -> None:
        self.indices = list(indices)
        self._cache: dict = {}

    def index(self, device) -> torch.Tensor:
        key = ("index", device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.indices, dtype=torch.long, device=device)
        return self._cache[key]

    def positions(self, vocab: int, device) -> torch.Tensor:
        """(V,) long: the row of T for each token id, −1 for the others."""
        key = ("pos", vocab, device)
        if key not in self._cache:
            pos = torch.full((vocab,), -1, dtype=torch.long, device=device)
            pos[self.index(device)] = torch.arange(len(self.indices), device=device)
            self._cache[key] = pos
        return self._cache[key]


class TokenSlot(Slot):
    """Trainable rows T (k, d) of an ``nn.Embedding`` (``trainable_tokens_delta``); see the module docstring."""

    roles = (ROLE,)
    method = "lora"
    keeps_ties = True  # the modules that share the weight get a TiedTokenSlot: a merge keeps their outputs
    combinable = False  # rows replaced, not a low-rank update

    def __init__(self, layer, name: str, indices: list[int]) -> None:
        super().__init__(layer, name)
        self.rows = TokenRows(indices)
        self._merged_rows: torch.Tensor | None = None

    @staticmethod
    def make_tensors(base_layer: nn.Module, indices: list[int]) -> dict[str, nn.Parameter]:
        """T = E[I] (k, d): a fresh adapter computes the base."""
        rows = base_layer.weight.detach()[torch.tensor(indices, device=base_layer.weight.device)]
        return {ROLE: nn.Parameter(rows.to(**adapter_tensor_kwargs(base_layer)).clone())}

    @property
    def values(self) -> nn.Parameter:
        return self.layer.trainable_tokens_delta[self.name]

    def diff(self) -> torch.Tensor:
        """T − E[I] (k, d) for the current base table (differentiable in T)."""
        weight = self.base_layer.weight
        return self.values - weight.detach()[self.rows.index(weight.device)].to(self.values.dtype)

    def contribute(self, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        base = self.base_layer
        pos = self.rows.positions(base.num_embeddings, x.device)[x]
        chosen = (pos >= 0).unsqueeze(-1)
        delta = F.embedding(pos.clamp_min(0), self.diff()) * chosen
        scale = getattr(base, "embed_scale", None)
        if scale is not None:
            delta = delta * (scale.to(delta.dtype) if isinstance(scale, torch.Tensor) else scale)
        return result + (delta * weight).to(result.dtype)

    # the dense (out, in) view of an embedding is Eᵀ (d, V): token i is column i
    def merged(self, weight_matrix: torch.Tensor, weight: float) -> torch.Tensor:
        """Columns I of Eᵀ ← E[I] + w·(T − E[I]) (T itself for w = 1); E[I] kept for :meth:`unmerged`."""
        idx = self.rows.index(weight_matrix.device)
        old = weight_matrix[:, idx].clone()
        out = weight_matrix.clone()
        out[:, idx] = old + weight * (self.values.detach().t().to(old) - old)
        self._merged_rows = old
        return out

    def unmerged(self, weight_matrix: torch.Tensor, weight: float) -> torch.Tensor:
        """Columns I put back as they were before the merge (exactly)."""
        if self._merged_rows is None:
            raise MergeError(f"trainable tokens of adapter {self.name!r}: no merge of them to undo in this process")
        out = weight_matrix.clone()
        out[:, self.rows.index(weight_matrix.device)] = self._merged_rows.to(out)
        self._merged_rows = None
        return out

    def delta_weight(self) -> torch.Tensor:
        """Eᵀ' − Eᵀ (d, V), fp32: T − E[I] in columns I."""
        weight = self.base_layer.weight
        out = torch.zeros(weight.shape[1], weight.shape[0], dtype=torch.float32, device=weight.device)
        out[:, self.rows.index(weight.device)] = self.diff().detach().float().t()
        return out

    def describe(self) -> str:
        return f"trainable tokens {self.rows.indices[:8]}{' ...' if len(self.rows.indices) > 8 else ''}"


class TiedTokenSlot(Slot):
    """The same rows on a module that shares the embedding's weight (a tied ``nn.Linear`` output head, weight
    (V, d)): logits for the tokens in I become x Tᵀ. Holds no tensor: it reads the embedding's slot ``source``.
    Its merge is a no-op, since the embedding's merge writes the shared weight."""

    roles = ()
    method = "lora"
    keeps_ties = True
    combinable = False

    def __init__(self, layer, name: str, source: TokenSlot) -> None:
        super().__init__(layer, name)
        self.source = source

    def contribute(self, x: torch.Tensor, result: torch.Tensor, weight: float) -> torch.Tensor:
        diff = self.source.diff()
        extra = x.to(diff.dtype) @ diff.t() * weight  # (..., k)
        return result.index_add(-1, self.source.rows.index(result.device), extra.to(result.dtype))

    def merged(self, weight_matrix: torch.Tensor, weight: float) -> torch.Tensor:
        return weight_matrix

    def unmerged(self, weight_matrix: torch.Tensor, weight: float) -> torch.Tensor:
        return weight_matrix

    def delta_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)

    def describe(self) -> str:
        return "tied to trainable tokens"


def check_token_indices(value) -> list[int] | dict[str, list[int]] | None:
    """``trainable_token_indices``: None, a list of token ids (the input embeddings'), or ``{module name: ids}``."""
    if value is None:
        return None

    def ids(v, where: str) -> list[int]:
        if isinstance(v, tuple):
            v = list(v)
        if (not isinstance(v, list) or not v or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                        for i in v)):  # fmt: skip
            raise ConfigError(
                f"trainable_token_indices{where} must be a non-empty list of token ids (ints ≥ 0), got {v!r}; e.g. "
                f"[32000, 32001] for the input embeddings or {{'embed_tokens': [32000, 32001]}}"
            )
        if len(set(v)) != len(v):
            raise ConfigError(f"trainable_token_indices{where} lists a token twice: {v!r}")
        return v

    if isinstance(value, dict):
        if not value or not all(isinstance(k, str) and k for k in value):
            raise ConfigError(f"trainable_token_indices as a dict maps module names to token ids; got {value!r}")
        return {k: ids(v, f"[{k!r}]") for k, v in value.items()}
    return ids(value, "")


def token_targets(model: nn.Module, value, skip) -> dict[str, list[int]]:
    """``{embedding path: indices}`` for ``trainable_token_indices`` (a list: the input embeddings').

    Raises:
        ConfigError: no input embeddings, a name that matches no ``nn.Embedding``, or an index ≥ the vocabulary.
    """
    modules = [(p, m) for p, m in base_view(model) if p and p not in skip]
    if isinstance(value, list):
        get = getattr(model, "get_input_embeddings", None)
        try:
            emb = get() if get is not None else None
        except NotImplementedError:
            emb = None
        emb = emb.base_layer if isinstance(emb, AdapterLayer) else emb
        found = [p for p, m in modules if emb is not None and m is emb]
        if not found:
            raise ConfigError(
                f"trainable_token_indices as a list applies to the input embeddings, and {type(model).__name__} has "
                f"none (get_input_embeddings()); pass {{'<embedding module name>': [ids]}} instead"
            )
        value = {found[0]: value}
    out: dict[str, list[int]] = {}
    for name, indices in value.items():
        hits = [(p, m) for p, m in modules if name_matches(p, name) and isinstance(m, nn.Embedding)]
        if not hits:
            names = [p for p, m in modules if isinstance(m, nn.Embedding)]
            raise ConfigError(
                f"trainable_token_indices names {name!r}, which matches no nn.Embedding of {type(model).__name__}; "
                f"its embeddings: {', '.join(names[:8]) or 'none'}"
            )
        for path, module in hits:
            too_big = [i for i in indices if i >= module.num_embeddings]
            if too_big:
                raise ConfigError(
                    f"trainable_token_indices for {path}: token ids {too_big[:5]} are outside its vocabulary of "
                    f"{module.num_embeddings}; resize the embeddings first (model.resize_token_embeddings)"
                )
            out[path] = indices
    return out


def tied_modules(model: nn.Module, path: str) -> list[str]:
    """Paths of the other modules whose ``weight`` is the embedding at ``path``'s (a tied output head).

    Raises:
        ConfigError: a module sharing it is not an ``nn.Linear`` (the rows could not follow there).
    """
    modules = dict(base_view(model))
    weight = modules[path].weight
    out = []
    for other, module in modules.items():
        if other and other != path and getattr(module, "weight", None) is weight:
            if not isinstance(module, nn.Linear):
                raise ConfigError(
                    f"trainable tokens on {path}: its weight is shared with {other} ({type(module).__name__}), where "
                    f"peftlab cannot replace the same rows; untie them first"
                )
            out.append(other)
    return out


def inject_tokens(model: nn.Module, config, txn, lora_targets: list[str]) -> list[str]:
    """Add a :class:`TokenSlot` to every embedding ``config.trainable_token_indices`` names and a
    :class:`TiedTokenSlot` to every module tied to it; returns their paths.

    Raises:
        ConfigError: an embedding that LoRA targets too (one adapter adapts a module one way).
    """
    specs = token_targets(model, config.trainable_token_indices, txn.skip)
    both = sorted(set(specs) & set(lora_targets))
    if both:
        raise ConfigError(
            f"{both[0]} is in target_modules and in trainable_token_indices; an adapter trains its rows or gives it a "
            f"LoRA, not both (HF PEFT refuses this too): drop it from one of them"
        )
    paths: list[str] = []
    for path, indices in specs.items():
        base = dict(base_view(model))[path]
        tied = tied_modules(model, path)
        slot = txn.add_slot(
            path, lambda layer, i=indices: TokenSlot(layer, config.adapter_name, i), TokenSlot.make_tensors(base, indices)
        )
        for other in tied:
            if other in txn.skip:
                raise ConfigError(
                    f"{other} is in modules_to_save and shares its weight with {path}, whose rows {indices[:5]} train: "
                    f"a trained copy of it would drop the tie; leave it out of modules_to_save (its rows follow {path}'s)"
                )
            if other in lora_targets:
                raise ConfigError(
                    f"{other} shares its weight with {path}, whose rows {indices[:5]} train: it cannot take a LoRA in "
                    f"the same adapter; leave it out of target_modules"
                )
            txn.add_slot(other, lambda layer, s=slot: TiedTokenSlot(layer, config.adapter_name, s), {})
        paths += [path, *tied]
    return paths
