"""Where bottleneck adapters go: the residual points of every transformer block, read from the model's structure.

For each block that :func:`peftlab.core.structure.structure` finds (any stack: a decoder's layers, an
encoder's and a decoder's blocks of a seq2seq model) there are two sites:

* ``attn``: the self-attention sublayer. ``out`` is its output projection (``o_proj``, ``c_proj``,
  ``dense``, ``attention.output.dense``...): serial adapters wrap it, so they act on the sublayer
  output before the residual add (and before the LayerNorm that follows the add in post-norm BERT
  blocks). ``in`` is its first input projection (``q_proj``, fused ``c_attn``/``qkv_proj``...), whose
  input *is* the sublayer input; parallel adapters read it there (a forward pre-hook).
* ``ffn``: the feed-forward sublayer; ``out`` = its output projection (``down_proj``, ``fc2``, ``wo``,
  ``output.dense``...), ``in`` = its first input projection (``gate_proj``, ``fc1``, ``wi``,
  ``intermediate.dense``...). In a mixture-of-experts block both are the whole MoE module (experts, router
  and shared expert together), so the adapter sees the sublayer's full output.

Cross-attention sublayers of decoder blocks get no adapter (as AdapterHub's default configs).
Where the structure can't tell (a model that is not built of repeated attention blocks), the
config's regexes (``attn_out``, ``ffn_out``, ``attn_in``, ``ffn_in``, ``norms``; first group = layer
index) name the modules; given regexes also override the structural sites.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ...core.structure import base_view, structure
from ...util.errors import ConfigError, TargetError

KINDS = ("attn", "ffn")


@dataclass(frozen=True)
class Site:
    """One residual point: ``out`` (wrapped by serial adapters; its output dimension is d) and ``inp``
    (read by parallel adapters: the sublayer input), in block ``index`` of ``stack``."""

    stack: str
    index: int
    kind: str
    out: str
    inp: str | None
    width: int | None = None  # d of a site whose ``out`` is a whole MoE block (not a linear layer)


def _regex_matches(model: nn.Module, pattern: str) -> dict[int, str]:
    found = {}
    for path, _ in base_view(model):
        m = re.fullmatch(pattern, path)
        if m:
            try:
                index = int(m.group(1))
            except (IndexError, TypeError, ValueError):
                raise ConfigError(
                    f"site regex {pattern!r} must have a first group that captures the layer index, e.g. "
                    f"r'.*layers\\.(\\d+)\\.mlp\\.down_proj'"
                ) from None
            found[index] = path
    return found


def find_sites(model: nn.Module, overrides: dict[str, str | None] | None = None) -> list[Site]:
    """Every block's ``attn`` and ``ffn`` sites, in model order (see the module docstring).

    Raises:
        TargetError: no transformer blocks found and no ``attn_out``/``ffn_out`` regexes given; says
            which config fields to set.
    """
    given = {k: v for k, v in (overrides or {}).items() if v}
    found = structure(model).main()  # a VLM's language model (as LoRA's defaults and prefixes)
    sites: list[Site] = []
    for block in found.blocks:
        attn = next((a for a in block.attention if a.kind == "self"), None)
        if attn is not None and attn.o:
            first = attn.path  # the attention module's input (Longformer's q reads a transposed copy of it)
            sites.append(Site(block.stack, block.index, "attn", attn.o, first))
        if block.ffn_out:
            inp = block.ffn_in[0] if block.ffn_in else None
            sites.append(Site(block.stack, block.index, "ffn", block.ffn_out, inp, block.moe_width))
    if not any(f"{k}_out" in given or f"{k}_in" in given for k in KINDS):
        if not sites:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            raise TargetError(
                f"bottleneck adapters found no transformer blocks in {type(model).__name__} (model_type {model_type!r}): "
                f"no repeated blocks with an attention module (q/k/v or fused qkv projections) and a feed-forward. "
                f"Name its modules yourself with regexes whose first group is the layer index, e.g. "
                f"AdapterConfig(attn_out=r'.*layers\\.(\\d+)\\.attn\\.out_proj', ffn_out=r'.*layers\\.(\\d+)\\.mlp\\.fc_out'); "
                f"parallel adapters also need attn_in / ffn_in (modules whose input is the sublayer input), "
                f"train_layernorm needs norms."
            )
        return sites
    # regex overrides: replace the structural sites of a kind whose out (or in) regex is given
    out: list[Site] = []
    for kind in KINDS:
        outs = _regex_matches(model, given[f"{kind}_out"]) if f"{kind}_out" in given else None
        ins = _regex_matches(model, given[f"{kind}_in"]) if f"{kind}_in" in given else None
        mine = [s for s in sites if s.kind == kind]
        if outs is None and ins is None:
            out.extend(mine)
            continue
        if outs is None:
            if not mine:
                raise TargetError(f"{kind}_in is given but no {kind}_out: name the {kind} output modules with {kind}_out")
            outs = {s.index: s.out for s in mine}
        default_in = {s.index: s.inp for s in mine}
        for index, path in sorted(outs.items()):
            inp = (ins or {}).get(index, default_in.get(index))
            out.append(Site("", index, kind, path, inp))
    return out


def find_norms(model: nn.Module, pattern: str | None, layers: list[int] | None) -> list[str]:
    """Paths of the blocks' norm modules (structural, or those matching ``pattern``), in ``layers``."""
    if pattern:
        paths = []
        for path, _ in model.named_modules():
            m = re.fullmatch(pattern, path)
            if m and (layers is None or int(m.group(1)) in layers):
                paths.append(path)
        return paths
    return [n for b in structure(model).main().blocks if layers is None or b.index in layers for n in b.norms]


# ---- legacy regex table, kept only for peftlab.estimator.model (which works from a config alone) ----------


@dataclass(frozen=True)
class AdapterSites:
    attn_out: str
    ffn_out: str
    attn_in: str
    ffn_in: str
    norms: str


_LLAMA = AdapterSites(
    attn_out=r".*layers\.(\d+)\.self_attn\.o_proj",
    ffn_out=r".*layers\.(\d+)\.mlp\.down_proj",
    attn_in=r".*layers\.(\d+)\.self_attn",
    ffn_in=r".*layers\.(\d+)\.mlp",
    norms=r".*layers\.(\d+)\.(input_layernorm|post_attention_layernorm)",
)
_BERT = AdapterSites(
    attn_out=r".*encoder\.layer\.(\d+)\.attention\.output\.dense",
    ffn_out=r".*encoder\.layer\.(\d+)\.output\.dense",
    attn_in=r".*encoder\.layer\.(\d+)\.attention\.self",
    ffn_in=r".*encoder\.layer\.(\d+)\.intermediate",
    norms=r".*encoder\.layer\.(\d+)\.(attention\.output\.LayerNorm|output\.LayerNorm)",
)
_LEGACY = {"bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "electra": _BERT,
           "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA}  # fmt: skip


def sites_for(model_type: str | None, overrides: dict[str, str | None]) -> AdapterSites:
    """Regex sites for the config-only estimator (:mod:`peftlab.estimator.model`); wrapping uses :func:`find_sites`."""
    given = {k: v for k, v in overrides.items() if v}
    if model_type in _LEGACY:
        return AdapterSites(**{**_LEGACY[model_type].__dict__, **given})
    if "attn_out" not in given or "ffn_out" not in given:
        raise TargetError(
            f"the estimator has no adapter sites for model_type {model_type!r}; pass attn_out/ffn_out regexes "
            f"(first group = layer index)"
        )
    return AdapterSites(given["attn_out"], given["ffn_out"], given.get("attn_in", ""), given.get("ffn_in", ""),
                        given.get("norms", ""))  # fmt: skip
