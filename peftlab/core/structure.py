"""The structure of a transformers model, read from its module tree (no per-model table).

Blocks (the members of a ``ModuleList`` that hold an attention module), the attention roles of their
projections (q, k, v, fused qkv, output), the feed-forward projections and norms, the output head; and the
plain view of a wrapped model (:func:`base_view`), which every targeting step reads.
"""

from __future__ import annotations

import functools
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


#: Predicates registered by higher layers for linear layers that are not ``nn.Linear`` (e.g. a quantized
#: backend's own module type); see :func:`register_linear_predicate`.
_LINEAR_PREDICATES: list = []


def register_linear_predicate(predicate) -> None:
    """Count modules for which ``predicate(module)`` is true as linear layers (targets of ``"all-linear"``)."""
    if predicate not in _LINEAR_PREDICATES:
        _LINEAR_PREDICATES.append(predicate)


def is_linear(module: nn.Module) -> bool:
    """A linear layer: ``y = x Wᵀ + b``. A MoE router that subclasses ``nn.Linear`` with its own forward is not one
    (Llama-4's ``Llama4Router`` returns ``(scores, logits)``); its weight takes LoRA as a parameter
    (``LoraConfig.target_parameters``). Other subclasses with their own forward (Falcon's ``FalconLinear``,
    quantized linears) are, and so are modules a registered predicate accepts (a quantized backend's own type)."""
    if not isinstance(module, linear_types()):
        return any(p(module) for p in _LINEAR_PREDICATES)
    cls = type(module)
    return not ("router" in cls.__name__.lower() and cls.forward is not nn.Linear.forward)


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
    under the wrapper's path, the base module's own submodules under their plain paths (a bottleneck
    adapter around a whole MoE block leaves its experts targetable as ``...mlp.experts``), and the
    wrapper's adapter tensors and head copies are not listed. Targeting a wrapped module adds a slot
    to its wrapper."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(path: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        out.append((path, base))
        if isinstance(module, AdapterLayer) and any(s.replaces_base for s in module.slots.values()):
            return  # a trained head copy computes the output: the modules inside its base never run
        for name, child in base.named_children():
            if child is not None:
                visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    return out


_Q = {"q", "query", "wq", "q_proj", "query_proj", "q_lin"}


_K = {"k", "key", "wk", "k_proj", "key_proj", "k_lin"}


_V = {"v", "value", "wv", "v_proj", "value_proj", "v_lin"}


_QKV = {"c_attn", "query_key_value", "qkv_proj", "wqkv", "qkv", "in_proj", "w_pack"}


_O = {"o", "o_proj", "out_proj", "out_lin", "dense", "c_proj", "wo", "out", "output"}


#: Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): queries through a rank-q_lora_rank bottleneck
#: (``q_a_proj`` down, ``q_b_proj`` up; ``q_proj`` when there is none), keys and values from one compressed
#: latent (``kv_a_proj_with_mqa`` down, ``kv_b_proj`` up to the per-head keys and values).
_MLA = {"q_a_proj": "q_a", "q_b_proj": "q", "kv_a_proj_with_mqa": "kv_a", "kv_b_proj": "kv"}


#: Words in the class name of a block's token mixer that is not attention (Mamba / SSM layers, gated delta-net
#: linear attention, short convolutions): its projections are neither attention roles nor the feed-forward.
_MIXER_WORDS = ("mamba", "mixer", "ssm", "deltanet", "linearattention", "shortconv", "recurrent", "rglru")


@dataclass
class AttentionSite:
    """One attention module of a block.

    Attributes:
        path: the module that computes attention (holds or calls the q/k/v projections).
        kind: "self" or "cross" (the second attention of a decoder block attends to the encoder).
        q, k, v: paths of separate projections; qkv: path of a fused projection (then q, k, v are None).
        o: path of the output projection (``attention.output.dense`` in BERT-style blocks).
        q_a, kv_a, kv: multi-head latent attention (DeepSeek): the query down-projection (``q_a_proj``; ``q`` is
            its up-projection ``q_b_proj``), the key-value latent down-projection (``kv_a_proj_with_mqa``) and
            its up-projection to keys and values (``kv_b_proj``, which plays v's part: k and v are None).
    """

    path: str
    kind: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    o: str | None = None
    q_a: str | None = None
    kv_a: str | None = None
    kv: str | None = None

    def projections(self) -> list[str]:
        return [p for p in (self.q_a, self.q, self.k, self.v, self.qkv, self.kv_a, self.kv) if p]


@dataclass
class BlockSite:
    """One transformer block: ``stack`` (the ModuleList path) and its ``index`` in it, its attention
    modules (self first; none in the Mamba / linear-attention / convolution layers of a hybrid stack), the
    feed-forward input projections ``ffn_in`` (whose input is the sublayer input) and output projection
    ``ffn_out`` (whose output is added to the residual), and its norms."""

    path: str
    stack: str
    index: int
    attention: list[AttentionSite] = field(default_factory=list)
    ffn_in: list[str] = field(default_factory=list)
    ffn_out: str | None = None
    norms: list[str] = field(default_factory=list)
    #: the hidden width d of a mixture-of-experts feed-forward, whose ``ffn_out`` (= ``ffn_in[0]``) is the whole
    #: MoE block (the module holding the experts, router and any shared expert), not a linear layer
    moe_width: int | None = None
    #: a mixture of experts held directly by the block, with no module around it (Gemma-4's ``experts`` beside its
    #: dense ``mlp``, combined in the block's forward): the experts' path; the block then has no ``ffn_out``
    inline_experts: str | None = None


@dataclass
class Structure:
    """What :func:`structure` found: ``blocks`` in model order, ``stacks`` (ModuleList paths), ``head``, and
    ``language``: the path of the language model of a model with several towers (a VLM's
    ``model.language_model``; None when the whole model is one language model or none is told apart)."""

    blocks: list[BlockSite]
    stacks: list[str]
    head: list[str]
    language: str | None = None

    def attention(self, kind: str | None = None) -> list[AttentionSite]:
        return [a for b in self.blocks for a in b.attention if kind is None or a.kind == kind]

    def blocks_of(self, stack: str) -> list[BlockSite]:
        return [b for b in self.blocks if b.stack == stack]

    def towers(self) -> dict[str, list[str]]:
        """Stacks by tower: ``"language"`` (the language model's) and, for a VLM, the others under their top
        path (``"model.visual"``, ``"model.vision_tower"``...); one ``"model"`` tower when no language model is
        told apart (text-only models, CLIP's two peer towers, speech and vision encoders)."""
        out: dict[str, list[str]] = {}
        for stack in self.stacks:
            out.setdefault(self._tower(stack), []).append(stack)
        return out

    def _tower(self, stack: str) -> str:
        if self.language is None:
            return "model"
        if _under(stack, self.language):
            return "language"
        parts = stack.split(".")
        common = self.language.split(".")
        i = 0
        while i < len(parts) and i < len(common) and parts[i] == common[i]:
            i += 1
        return ".".join(parts[: i + 1])

    def main(self) -> Structure:
        """The language model's part (all of it when there is one tower): where LoRA's default targets,
        bottleneck adapters and prefixes go unless asked otherwise, as HF PEFT prefixes a VLM's language model."""
        if self.language is None:
            return self
        keep = [s for s in self.stacks if _under(s, self.language)]
        return Structure([b for b in self.blocks if b.stack in keep], keep, self.head, self.language)


def _under(path: str, root: str) -> bool:
    return not root or path == root or path.startswith(root + ".")


def _role(name: str) -> str | None:
    low = name.lower()
    if low in _MLA:
        return _MLA[low]
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


def _attention_sites(block: nn.Module, bpath: str, like: frozenset = frozenset()) -> list[AttentionSite]:
    """The innermost attention modules of a block that own q/k/v (or fused) projections, in order. A module of a
    type in ``like`` (the attention types of the other blocks of its stack) needs only a query projection: it reads
    another layer's keys and values (Gemma-4's KV-shared layers: q and o only) or uses its keys as values
    (Gemma-4's ``attention_k_eq_v`` full-attention layers: no v)."""
    cores: list[tuple[str, nn.Module]] = []
    for name, sub in block.named_modules():
        if not name or not _is_attention(sub):
            continue
        lin = _linears(sub, f"{bpath}.{name}")
        roles = {_role(p.rsplit(".", 1)[-1]) for p, _ in lin}
        full = {"q", "k", "v"} <= roles or "qkv" in roles or {"q", "kv"} <= roles
        if not (full or (type(sub) in like and "q" in roles)):
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


def _mixers(block: nn.Module, bpath: str) -> tuple[str, ...]:
    """Path prefixes of a block's non-attention token mixers (see ``_MIXER_WORDS``)."""
    return tuple(
        f"{bpath}.{n}." for n, m in block.named_modules() if n and any(w in type(m).__name__.lower() for w in _MIXER_WORDS)
    )


def _has_experts(block: nn.Module) -> bool:
    """True when a block's feed-forward is a mixture of experts: a module named ``experts`` or whose class
    name says ``Experts`` (transformers 5 keeps the experts as 3-D parameters there)."""
    return any(
        n.rsplit(".", 1)[-1] == "experts" or "experts" in type(m).__name__.lower() for n, m in block.named_modules() if n
    )


def _expert_holders(block: nn.Module) -> list[str]:
    """Paths in ``block`` of the modules that hold experts (see :func:`_has_experts`)."""
    return [
        n for n, m in block.named_modules() if n and (n.rsplit(".", 1)[-1] == "experts" or "experts" in type(m).__name__.lower())
    ]


def _moe_block(block: nn.Module) -> tuple[str, int] | None:
    """(path in ``block``, hidden width) of the module that holds a block's experts (Qwen3-MoE's ``mlp``, Jamba's
    ``feed_forward``, Granite's ``block_sparse_moe``): its input is the sublayer input and its output (or the
    first element of the tuple it returns) the sublayer output. The width is read from the router beside the
    experts (a 2-D weight with one row per expert); None when there is no such module or router."""
    for name, sub in block.named_modules():
        if not name or not (name.rsplit(".", 1)[-1] == "experts" or "experts" in type(sub).__name__.lower()):
            continue
        parent = name.rpartition(".")[0]
        if not parent:
            return None
        stacks = [p for p in sub.parameters(recurse=False) if p.ndim == 3]
        experts = stacks[0].shape[0] if stacks else len(list(sub.children()))
        for child_name, child in block.get_submodule(parent).named_children():
            weight = getattr(getattr(child, "base_layer", child), "weight", None)
            if child_name != name.rsplit(".", 1)[-1] and isinstance(weight, nn.Parameter) and weight.ndim == 2:
                if weight.shape[0] == experts:
                    return parent, weight.shape[1]
        return None
    return None


def _one_feed_forward(others: list[tuple[str, nn.Module]], bpath: str) -> list[tuple[str, nn.Module]]:
    """The linear layers of a block's feed-forward among its non-attention ones: those of the first child module
    that holds a whole feed-forward (a layer reading the hidden width and one writing it) when others lie outside
    it (Gemma-4's per-layer-input gate and projection beside its ``mlp``); all of them otherwise (BERT's
    ``intermediate.dense`` and ``output.dense`` are one feed-forward across two children)."""
    if not others:
        return others
    hidden = _dims(others[0][1])[0]
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for path, module in others:
        rel = path[len(bpath) + 1 :]
        if "." in rel:
            groups.setdefault(rel.split(".", 1)[0], []).append((path, module))
    for members in groups.values():
        reads = any(_dims(m)[0] == hidden for _, m in members)
        writes = any(_dims(m)[1] == hidden for _, m in members)
        if reads and writes and len(members) < len(others):
            return members
    return others


def _block_site(block: nn.Module, bpath: str, stack: str, index: int, like: frozenset = frozenset()) -> BlockSite:
    sites = _attention_sites(block, bpath, like)
    taken = {p for s in sites for p in (*s.projections(), s.o) if p}
    attn_paths = tuple(s.path + "." for s in sites) + _mixers(block, bpath)
    others = [(p, m) for p, m in _linears(block, bpath) if p not in taken and not p.startswith(attn_paths)]
    site = BlockSite(path=bpath, stack=stack, index=index, attention=sites)
    if _has_experts(block):  # a mixture of experts: no single linear layer carries the sublayer's output (a
        others = []  # shared expert's down_proj is one summand of it): the site is the whole MoE block
        moe = _moe_block(block)
        if moe is not None:
            site.ffn_out, site.ffn_in, site.moe_width = f"{bpath}.{moe[0]}", [f"{bpath}.{moe[0]}"], moe[1]
        else:
            site.inline_experts = next((f"{bpath}.{n}" for n in _expert_holders(block) if "." not in n), None)
    others = _one_feed_forward(others, bpath)
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

    * blocks: the members of every ``ModuleList`` of which at least one contains an attention module (a module
      whose class name says ``Attention`` and that owns query/key/value projections, separate, fused, or
      multi-head latent); in hybrid stacks (Qwen3-Next, Jamba, Granite-4-H, LFM2) the Mamba / linear-attention /
      convolution layers are blocks without attention. Nested lists inside a block (T5's ``layer``) are part of
      it; a list of stages that each hold a list of attention blocks (Swin) is not a stack, its inner lists are.
      A model with no attention at all (ConvNeXt) has blocks without attention: the members of the innermost
      lists whose every member has a feed-forward (ConvNeXt's ``stages.i.layers`` with ``pwconv1``/``pwconv2``).
    * attention roles by projection name (q/query/q_proj/q_lin..., k..., v..., fused c_attn /
      query_key_value / qkv_proj / Wqkv, output o/o_proj/out_proj/dense/c_proj/out_lin); a BERT-style
      output projection beside the attention core is found under their common parent.
    * feed-forward: the block's other linear layers; ``ffn_out`` is the last one whose output has the
      hidden size, ``ffn_in`` those reading the hidden state.
    * head: the top-level modules with parameters that hold no block and are not the input embeddings
      (``lm_head``, ``score``, ``classifier``, ``pre_classifier``, ``pooler``, ``classification_head``...).
    * language: a VLM's language model (the module holding the input embeddings), told apart from its other
      towers; :meth:`Structure.main` is its part.
    """
    blocks: list[BlockSite] = []
    stacks: list[str] = []
    for path, module in base_view(model):
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(b.path + ".") for b in blocks):
            continue
        members = [m.base_layer if isinstance(m, AdapterLayer) else m for m in module]
        prefix = f"{path}." if path else ""
        found = [_block_site(child, f"{prefix}{i}", path, i) for i, child in enumerate(members)]
        if not any(site.attention for site in found) or any(_holds_stack(child) for child in members):
            continue  # no attention anywhere (experts, convolution stages), or stages of inner block lists (Swin)
        like = frozenset(_attention_types(members, found))
        if any(not site.attention for site in found):  # layers whose attention borrows keys/values (Gemma-4)
            found = [_block_site(child, f"{prefix}{i}", path, i, like) for i, child in enumerate(members)]
        blocks.extend(found)
        stacks.append(path)
    if not stacks:  # no attention anywhere (ConvNeXt): stacks of feed-forward blocks, if any
        blocks, stacks = _feed_forward_stacks(model)
    inp = _input_embeddings(model)
    head: list[str] = []
    for name, child in model.named_children():
        if child is inp or name.startswith("peftlab_") or not any(True for _ in child.parameters()):
            continue
        if any(s == name or s.startswith(name + ".") for s in stacks):
            continue
        head.append(name)
    return Structure(blocks=blocks, stacks=stacks, head=head, language=_language_root(model, inp, stacks))


def _attention_types(members: list[nn.Module], found: list[BlockSite]) -> set[type]:
    """The module types of the attention sites found in a stack's blocks."""
    return {
        type(child.get_submodule(a.path[len(site.path) + 1 :])) for child, site in zip(members, found) for a in site.attention
    }


def _feed_forward_stacks(model: nn.Module) -> tuple[list[BlockSite], list[str]]:
    """Blocks of an attention-free model (ConvNeXt: a depthwise convolution mixes tokens, then an MLP of
    linear layers): the innermost ``ModuleList`` s whose every member has a feed-forward (linear layers reading
    and writing one width); their blocks have no attention site. Lists holding such lists (ConvNeXt's stages)
    are not stacks."""
    lists: list[tuple[str, list[BlockSite]]] = []
    for path, module in base_view(model):
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        members = [m.base_layer if isinstance(m, AdapterLayer) else m for m in module]
        prefix = f"{path}." if path else ""
        found = [_block_site(child, f"{prefix}{i}", path, i) for i, child in enumerate(members)]
        if all(site.ffn_out and site.ffn_in for site in found):
            lists.append((path, found))
    inner = [(p, f) for p, f in lists if not any(q.startswith(f"{p}.") for q, _ in lists)]
    return [b for _, found in inner for b in found], [p for p, _ in inner]


def _holds_stack(module: nn.Module) -> bool:
    """True when ``module`` holds a ModuleList whose every member has attention: it is a stage of blocks
    (Swin's ``layers.i`` holding ``blocks``), not a block."""
    for name, sub in module.named_modules():
        if name and isinstance(sub, nn.ModuleList) and len(sub) and all(_attention_sites(m, "") for m in sub):
            return True
    return False


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    """``model.get_input_embeddings()``, or None where the model has none (CLIP's two towers, Wav2Vec2, ConvNeXt
    raise ``NotImplementedError``) or the method is missing."""
    get_in = getattr(model, "get_input_embeddings", None)
    if not callable(get_in):
        return None
    try:
        out = get_in()
    except (NotImplementedError, AttributeError):
        return None
    return out if isinstance(out, nn.Module) else None


def _language_root(model: nn.Module, inp: nn.Module | None, stacks: list[str]) -> str | None:
    """The path of the language model of a model with a text config beside others (a VLM: ``text_config`` and
    ``vision_config``), when some stacks lie outside the module holding the input embeddings; else None."""
    config = getattr(model, "config", None)
    if inp is None or config is None or not hasattr(config, "text_config"):
        return None
    if not any(hasattr(config, k) for k in ("vision_config", "audio_config", "vision_tower_config")):
        return None
    emb = next((p for p, m in model.named_modules() if m is inp), None)
    if emb is None:
        return None
    root = emb.rpartition(".")[0]
    if not root or all(_under(s, root) for s in stacks) or not any(_under(s, root) for s in stacks):
        return None
    return root


_TASK_MAPPINGS = (
    ("SEQ_CLS", ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",)),
    ("TOKEN_CLS", ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",)),
    ("QUESTION_ANS", ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",)),
    ("SEQ_2_SEQ_LM", ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",)),
    ("CAUSAL_LM", ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES")),
    ("FEATURE_EXTRACTION", ("MODEL_MAPPING_NAMES",)),
)


@functools.lru_cache(maxsize=1)
def _task_classes() -> dict[str, set[str]]:
    from transformers.models.auto import modeling_auto

    out: dict[str, set[str]] = {}
    for task, names in _TASK_MAPPINGS:
        classes: set[str] = set()
        for name in names:
            for value in getattr(modeling_auto, name, {}).values():
                classes.update(value if isinstance(value, (tuple, list)) else (value,))
        out[task] = classes
    return out


def _takes_token_inputs(model: nn.Module) -> bool:
    """HF PEFT's task models call ``base(input_ids=..., attention_mask=..., inputs_embeds=...)``: the forward must
    name ``input_ids`` and ``inputs_embeds`` (CLIP, SigLIP, Swin, Whisper, Wav2Vec2 do not)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtin forward
        return False
    return "input_ids" in params and "inputs_embeds" in params


def task_type(model: nn.Module) -> str | None:
    """HF PEFT ``task_type`` for a transformers model: the task whose auto-model mapping lists its class
    (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` and image-text-to-text: ``CAUSAL_LM``; seq2seq LM: ``SEQ_2_SEQ_LM``;
    sequence / token classification, question answering; a bare text backbone: ``FEATURE_EXTRACTION``), and
    only when its forward takes the token inputs that task's peft model passes. ``None`` where no PEFT task
    fits (Whisper, CLIP, SigLIP, Swin, ViT, Wav2Vec2, custom modules): peft's plain ``PeftModel`` then calls
    the model with the caller's arguments unchanged, as peftlab does."""
    if not hasattr(model, "config"):
        return None
    name = type(model).__name__
    for task, classes in _task_classes().items():
        if name in classes:
            return task if _takes_token_inputs(model) else None
    return None
