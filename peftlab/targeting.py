"""Resolve which modules of a model get an adapter.

``target_modules`` may be:

* a list of names: a module matches when its dotted path equals a name or ends with
  ``"." + name`` (so ``"query"`` matches ``...attention.self.query``);
* a regex string: matched with ``re.fullmatch`` against every module path;
* ``"all-linear"``: every linear layer (``nn.Linear``, GPT-2 ``Conv1D``, bitsandbytes
  linears) except the output head (the output embeddings and a ``classifier``/``score`` head);
* ``None``: the per-architecture default from :data:`DEFAULT_TARGETS`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from .errors import TargetError

#: Default LoRA targets per ``config.model_type`` (the attention query and value projections).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "electra": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}

#: Classification-head attribute names excluded by ``"all-linear"``.
HEAD_NAMES = ("classifier", "score", "qa_outputs")


def linear_types() -> tuple[type, ...]:
    """Module types that count as linear layers (Conv1D and bitsandbytes types when importable)."""
    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - transformers always ships it
        pass
    return tuple(types)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, linear_types())


def head_module_names(model: nn.Module) -> set[str]:
    """Paths of the output head(s): output embeddings and classification heads."""
    heads: set[str] = set()
    by_id = {id(m): n for n, m in model.named_modules()}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None and id(out) in by_id:
        heads.add(by_id[id(out)])
    for attr in HEAD_NAMES:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            for name, mod in model.named_modules():
                if mod is head or name.startswith(by_id[id(head)] + "."):
                    heads.add(name)
    return heads


def name_matches(path: str, name: str) -> bool:
    """True when ``path`` equals ``name`` or ends with ``'.' + name``."""
    return path == name or path.endswith("." + name)


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise TargetError(
        f"no default target_modules for model_type {model_type!r}; pass target_modules explicitly "
        f"(a list of names, a regex, or 'all-linear'). Linear layers in this model include: "
        f"{', '.join(candidate_names(model)[:12])}. Architectures with defaults: {', '.join(sorted(DEFAULT_TARGETS))}"
    )


def base_view(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the model as if unwrapped: a peftlab wrapper shows as its base module
    under the wrapper's path, and nothing inside a wrapper (base_layer, adapter tensors, head
    copies) is listed. Targeting a wrapped module adds a slot to its wrapper."""
    from .layers import AdapterLayer

    out: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(w + ".") for w in inside):
            continue
        if isinstance(module, AdapterLayer):
            inside.append(path)
            module = module.base_layer
        out.append((path, module))
    return out


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last-component names of linear layers, in model order (for error messages)."""
    seen: dict[str, None] = {}
    for path, module in base_view(model):
        if is_linear(module):
            seen.setdefault(path.rsplit(".", 1)[-1], None)
    return list(seen)


def resolve_targets(
    model: nn.Module,
    target_modules: list[str] | str | None,
    predicate=is_linear,
    skip: Iterable[str] = (),
) -> list[str]:
    """Module paths to adapt, in model order.

    Args:
        model: the model to search.
        target_modules: see the module docstring.
        predicate: which module types may be adapted (linear layers by default).
        skip: paths never returned (e.g. modules already wrapped, ``modules_to_save``).

    Raises:
        TargetError: nothing matched, or a listed name matched nothing; the message lists
            valid candidate names.
    """
    skip = set(skip)
    if target_modules is None:
        target_modules = default_targets(model)
    modules = [(p, m) for p, m in base_view(model) if p and p not in skip]
    skip_prefixes = tuple(s + "." for s in skip)
    modules = [(p, m) for p, m in modules if not p.startswith(skip_prefixes)]

    if target_modules == "all-linear":
        heads = head_module_names(model)
        found = [p for p, m in modules if is_linear(m) and p not in heads]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise TargetError(f"target_modules regex {target_modules!r} is invalid: {exc}") from None
        found = [p for p, m in modules if pattern.fullmatch(p)]
    else:
        found = []
        unmatched = []
        for name in target_modules:
            hits = [p for p, _ in modules if name_matches(p, name)]
            if not hits:
                unmatched.append(name)
            found.extend(hits)
        if unmatched:
            raise TargetError(
                f"target module(s) {unmatched} not found in {type(model).__name__}; "
                f"candidate linear layers: {', '.join(candidate_names(model)[:20])}"
            )
        order = {p: i for i, (p, _) in enumerate(modules)}
        found = sorted(set(found), key=order.__getitem__)

    if not found:
        raise TargetError(
            f"target_modules={target_modules!r} matched no module in {type(model).__name__}; "
            f"candidate linear layers: {', '.join(candidate_names(model)[:20])}"
        )
    bad = [p for p in found if not predicate(dict(modules)[p])]
    if bad:
        kinds = sorted({type(dict(modules)[p]).__name__ for p in bad})
        raise TargetError(
            f"target module(s) {bad[:5]} are of type {kinds}, which this method cannot adapt; "
            f"candidate linear layers: {', '.join(candidate_names(model)[:20])}"
        )
    return found
