"""Resolve which modules of a model get an adapter.

``target_modules`` may be:

* a list of names: a module matches when its dotted path equals a name or ends with
  ``"." + name`` (so ``"query"`` matches ``...attention.self.query``);
* a regex string: matched with ``re.fullmatch`` against every module path;
* ``"all-linear"``: every linear layer (``nn.Linear``, GPT-2 ``Conv1D``, bitsandbytes
  linears) except the output head (the output embeddings and a ``classifier``/``score`` head);
* ``None``: the structural default (:func:`default_targets`): the query and value projections
  of every attention module, found by :func:`structure`.

:func:`structure` reads a transformers model's layout without per-model tables: the stacks of
repeated blocks, in each block its attention modules (self, then cross) with their q/k/v/o (or
fused qkv) projections, its feed-forward input and output projections, its norms, and the model's
head (the top-level modules outside the backbone). LoRA defaults, bottleneck-adapter sites
(:mod:`peftlab.methods.adapter_arch`) and prefix tuning (:mod:`peftlab.methods.prefix`) all use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from ..util.errors import TargetError
from .structure import base_view, head_module_names, is_linear, name_matches, structure

#: The few architectures whose defaults structure cannot tell (empty: every covered model is read from its
#: structure). ``{model_type: [names]}`` takes precedence over :func:`structure`.
OVERRIDES: dict[str, list[str]] = {}


def default_targets(model: nn.Module) -> list[str]:
    """LoRA's default targets: the query and value projections of every attention module of the language
    model, read from the model's structure (:func:`structure`, :meth:`~.structure.Structure.main`); a fused
    query-key-value projection (``c_attn``, ``query_key_value``, ``qkv_proj``, ``Wqkv``) is targeted whole;
    multi-head latent attention (DeepSeek) gives its query and key-value up-projections (``q_b_proj`` or
    ``q_proj``, ``kv_b_proj``); attention-free layers of a hybrid stack (Mamba, linear attention) get none. A model
    with no attention at all but blocks with a feed-forward (ConvNeXt) gets those blocks' feed-forward linear layers
    (``pwconv1``, ``pwconv2``; HF PEFT has no default for it).
    Returned as distinct module names, so the saved and exported ``target_modules`` are the names HF PEFT uses;
    for a VLM, whose vision tower may use the same names, as the full paths of the language model's modules.

    Raises:
        TargetError: no attention module with recognisable projections; lists the linear layers.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in OVERRIDES:
        return list(OVERRIDES[model_type])
    found = structure(model)
    main = found.main()
    paths: list[str] = []
    for attn in main.attention():
        if attn.qkv:
            paths.append(attn.qkv)
        else:
            paths.extend(p for p in (attn.q, attn.v or attn.kv) if p)
    if not paths and not main.attention():  # attention-free blocks (ConvNeXt): their feed-forward's linear layers
        view = dict(base_view(model))
        for block in main.blocks:
            paths.extend(p for p in (*block.ffn_in, block.ffn_out) if p and is_linear(view[p]))
    if paths and main is not found:  # another tower has modules of these names: name the language model's own
        return paths
    names = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in paths))
    if names:
        return names
    raise TargetError(
        f"no default target_modules for {type(model).__name__} (model_type {model_type!r}): its structure shows no "
        f"attention module with query/value projections. Pass target_modules explicitly (a list of names, a regex, "
        f"or 'all-linear'). Linear layers in this model include: {', '.join(candidate_names(model)[:12])}"
    )


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


# ---- structure: blocks, attention roles, feed-forward, head ---------------------------------------




def exact_targets(model: nn.Module, targets: list[str]) -> list[str] | str:
    """``target_modules`` that select exactly ``targets`` among the modules of ``model`` (as HF PEFT matches them:
    a name matches a path equal to it or ending in ``'.' + name``; a string is a ``re.fullmatch`` regex).

    The distinct last components when they pick no other module (``["q_proj", "v_proj"]``: what HF PEFT users
    write); else a full-path regex, one alternative per group of paths that differ only in a layer index
    (``model\\.language_model\\.layers\\.(?:0|1)\\.self_attn\\.q_proj|...``), so that names shared with another
    tower (a VLM's ``visual.blocks.0`` vs ``mlp.0``) or another kind of module cannot match.
    """
    paths = [p for p, _ in base_view(model) if p]
    wanted = set(targets)
    names = sorted({t.rsplit(".", 1)[-1] for t in targets})
    if {p for p in paths if any(name_matches(p, n) for n in names)} == wanted:
        return names
    pattern = paths_regex(targets)
    assert {p for p in paths if re.fullmatch(pattern, p)} == wanted, pattern  # the regex picks exactly the targets
    return pattern


def paths_regex(paths: list[str]) -> str:
    """A regex that matches exactly ``paths`` (dotted names): one alternative per group of paths that differ only in
    a layer index, e.g. ``model\\.layers\\.(?:0|1)\\.mlp\\.experts\\.gate_up_proj``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for path in paths:
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
        if m is None:
            groups.setdefault((re.escape(path), ""), [])
            continue
        groups.setdefault((re.escape(path[: m.start(1)]), re.escape(path[m.end(1) :])), []).append(m.group(1))
    return "|".join(h if not idx else f"{h}(?:{'|'.join(dict.fromkeys(idx))}){t}" for (h, t), idx in groups.items())
