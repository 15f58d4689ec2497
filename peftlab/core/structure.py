"""The structure of a transformers model, read from its module tree (no per-model table).

Blocks (the members of a ``ModuleList`` that hold an attention module), the attention roles of their
projections (q, k, v, fused qkv, output), the feed-forward projections and norms, the output head; and the
plain view of a wrapped model (:func:`base_view`), which every targeting step reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .layer import AdapterLayer, layer_dims

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


def base_view(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the model as if unwrapped: a peftlab wrapper shows as its base module
    under the wrapper's path, and nothing inside a wrapper (base_layer, adapter tensors, head
    copies) is listed. Targeting a wrapped module adds a slot to its wrapper."""
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


_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
    "ForQuestionAnswering": "QUESTION_ANS",
}


def task_type(model: nn.Module) -> str | None:
    """HF PEFT ``task_type`` for a transformers model class (None for bare backbones)."""
    name = type(model).__name__
    for suffix, task in _TASK_TYPES.items():
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if hasattr(model, "config") else None


