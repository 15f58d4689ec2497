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
from dataclasses import dataclass, field

from torch import nn

from .errors import TargetError

#: The few architectures whose defaults structure cannot tell (empty: every covered model is read from its
#: structure). ``{model_type: [names]}`` takes precedence over :func:`structure`.
OVERRIDES: dict[str, list[str]] = {}

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
    """LoRA's default targets: the query and value projections of every attention module, read from the
    model's structure (:func:`structure`); a fused query-key-value projection (``c_attn``,
    ``query_key_value``, ``qkv_proj``, ``Wqkv``) is targeted whole. Returned as distinct module names,
    so the saved and exported ``target_modules`` are the names HF PEFT uses.

    Raises:
        TargetError: no attention module with recognisable projections; lists the linear layers.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in OVERRIDES:
        return list(OVERRIDES[model_type])
    found = structure(model)
    names: dict[str, None] = {}
    for attn in found.attention():
        for path in (attn.qkv,) if attn.qkv else (attn.q, attn.v):
            if path:
                names.setdefault(path.rsplit(".", 1)[-1], None)
    if names:
        return list(names)
    raise TargetError(
        f"no default target_modules for {type(model).__name__} (model_type {model_type!r}): its structure shows no "
        f"attention module with query/value projections. Pass target_modules explicitly (a list of names, a regex, "
        f"or 'all-linear'). Linear layers in this model include: {', '.join(candidate_names(model)[:12])}"
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


# ---- structure: blocks, attention roles, feed-forward, head ---------------------------------------

_Q = {"q", "query", "wq", "q_proj", "query_proj", "q_lin"}
_K = {"k", "key", "wk", "k_proj", "key_proj", "k_lin"}
_V = {"v", "value", "wv", "v_proj", "value_proj", "v_lin"}
_QKV = {"c_attn", "query_key_value", "qkv_proj", "wqkv", "qkv", "in_proj", "w_pack"}
_O = {"o", "o_proj", "out_proj", "out_lin", "dense", "c_proj", "wo", "out", "output"}


@dataclass
class AttentionSite:
    """One attention module of a block.

    Attributes:
        path: the module that computes attention (holds or calls the q/k/v projections).
        kind: "self" or "cross" (the second attention of a decoder block attends to the encoder).
        q, k, v: paths of separate projections; qkv: path of a fused projection (then q, k, v are None).
        o: path of the output projection (``attention.output.dense`` in BERT-style blocks).
    """

    path: str
    kind: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    o: str | None = None

    def projections(self) -> list[str]:
        return [p for p in (self.q, self.k, self.v, self.qkv) if p]


@dataclass
class BlockSite:
    """One transformer block: ``stack`` (the ModuleList path) and its ``index`` in it, its attention
    modules (self first), the feed-forward input projections ``ffn_in`` (whose input is the sublayer
    input) and output projection ``ffn_out`` (whose output is added to the residual), and its norms."""

    path: str
    stack: str
    index: int
    attention: list[AttentionSite] = field(default_factory=list)
    ffn_in: list[str] = field(default_factory=list)
    ffn_out: str | None = None
    norms: list[str] = field(default_factory=list)


@dataclass
class Structure:
    """What :func:`structure` found: ``blocks`` in model order, ``stacks`` (ModuleList paths), ``head``."""

    blocks: list[BlockSite]
    stacks: list[str]
    head: list[str]

    def attention(self, kind: str | None = None) -> list[AttentionSite]:
        return [a for b in self.blocks for a in b.attention if kind is None or a.kind == kind]

    def blocks_of(self, stack: str) -> list[BlockSite]:
        return [b for b in self.blocks if b.stack == stack]


def _role(name: str) -> str | None:
    low = name.lower()
    for role, names in (("qkv", _QKV), ("q", _Q), ("k", _K), ("v", _V), ("o", _O)):
        if low in names:
            return role
    return None


def _is_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def _linears(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    from .layers import AdapterLayer

    out = []
    inside: list[str] = []
    for name, sub in module.named_modules():
        if any(name.startswith(w + ".") for w in inside):
            continue
        if isinstance(sub, AdapterLayer):
            inside.append(name)
            sub = sub.base_layer
        if name and is_linear(sub):
            out.append((f"{prefix}.{name}", sub))
    return out


def _dims(module: nn.Module) -> tuple[int, int]:
    from .layers import layer_dims

    return layer_dims(module)


def _attention_sites(block: nn.Module, bpath: str) -> list[AttentionSite]:
    """The innermost attention modules of a block that own q/k/v (or fused) projections, in order."""
    cores: list[tuple[str, nn.Module]] = []
    for name, sub in block.named_modules():
        if not name or not _is_attention(sub):
            continue
        lin = _linears(sub, f"{bpath}.{name}")
        roles = {_role(p.rsplit(".", 1)[-1]) for p, _ in lin}
        if not ({"q", "k", "v"} <= roles or "qkv" in roles):
            continue
        cores = [(n, m) for n, m in cores if not name.startswith(n + ".")]  # keep the innermost
        if not any(n.startswith(name + ".") for n, _ in cores):
            cores.append((name, sub))
    sites = []
    for i, (name, sub) in enumerate(cores):
        path = f"{bpath}.{name}"
        site = AttentionSite(path=path, kind="self" if i == 0 else "cross")
        for lpath, _ in _linears(sub, path):
            role = _role(lpath.rsplit(".", 1)[-1])
            if role and getattr(site, role) is None:
                setattr(site, role, lpath)
        if site.qkv:
            site.q = site.k = site.v = None
        if site.o is None:  # BERT-style: the output projection sits beside the core, under the same parent
            parent_name = name.rpartition(".")[0]
            if parent_name:
                parent = block.get_submodule(parent_name)
                for lpath, _ in _linears(parent, f"{bpath}.{parent_name}"):
                    if not lpath.startswith(path + "."):
                        site.o = lpath
                        break
        sites.append(site)
    return sites


def _block_site(block: nn.Module, bpath: str, stack: str, index: int) -> BlockSite | None:
    sites = _attention_sites(block, bpath)
    if not sites:
        return None
    taken = {p for s in sites for p in (*s.projections(), s.o) if p}
    attn_paths = tuple(s.path + "." for s in sites)
    others = [(p, m) for p, m in _linears(block, bpath) if p not in taken and not p.startswith(attn_paths)]
    site = BlockSite(path=bpath, stack=stack, index=index, attention=sites)
    if others:
        hidden = _dims(others[0][1])[0]
        outs = [p for p, m in others if _dims(m)[1] == hidden]
        site.ffn_out = outs[-1] if outs else others[-1][0]
        first = others[0][1]
        site.ffn_in = [p for p, m in others if p != site.ffn_out and _dims(m)[0] == _dims(first)[0]]
    site.norms = [
        f"{bpath}.{n}"
        for n, m in block.named_modules()
        if n and "norm" in type(m).__name__.lower() and not f"{bpath}.{n}".startswith(attn_paths)
    ]
    return site


def structure(model: nn.Module) -> Structure:
    """Read the layout of a transformers model from its module tree (no per-model table).

    * blocks: the members of every ``ModuleList`` whose members share one class and contain an attention
      module (a module whose class name says ``Attention`` and that owns query/key/value projections,
      separate or fused). Nested lists inside a block (T5's ``layer``) are part of it.
    * attention roles by projection name (q/query/q_proj/q_lin..., k..., v..., fused c_attn /
      query_key_value / qkv_proj / Wqkv, output o/o_proj/out_proj/dense/c_proj/out_lin); a BERT-style
      output projection beside the attention core is found under their common parent.
    * feed-forward: the block's other linear layers; ``ffn_out`` is the last one whose output has the
      hidden size, ``ffn_in`` those reading the hidden state.
    * head: the top-level modules with parameters that hold no block and are not the input embeddings
      (``lm_head``, ``score``, ``classifier``, ``pre_classifier``, ``pooler``, ``classification_head``...).
    """
    from .layers import AdapterLayer

    blocks: list[BlockSite] = []
    stacks: list[str] = []
    for path, module in base_view(model):
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(b.path + ".") for b in blocks):
            continue
        kinds = {type(m.base_layer if isinstance(m, AdapterLayer) else m) for m in module}
        if len(kinds) != 1:
            continue
        found = []
        for i, child in enumerate(module):
            site = _block_site(child, f"{path}.{i}" if path else str(i), path, i)
            if site is None:
                break
            found.append(site)
        else:
            blocks.extend(found)
            stacks.append(path)
    head: list[str] = []
    get_in = getattr(model, "get_input_embeddings", None)
    inp = get_in() if callable(get_in) else None
    for name, child in model.named_children():
        if child is inp or name.startswith("peftlab_") or not any(True for _ in child.parameters()):
            continue
        if any(s == name or s.startswith(name + ".") for s in stacks):
            continue
        head.append(name)
    return Structure(blocks=blocks, stacks=stacks, head=head)
