"""Where bottleneck adapters go, per architecture.

Each entry names, as regexes over module paths whose first group is the layer index:

* ``attn_out`` / ``ffn_out``: the output projection of the attention and feed-forward sublayers.
  Serial adapters wrap these, so they act on the sublayer output before the residual add (and,
  in post-norm BERT blocks, before the LayerNorm that follows the add).
* ``attn_in`` / ``ffn_in``: the module whose *input* is the sublayer input; parallel adapters
  read it there (a forward pre-hook) and add their output to the sublayer output.
* ``norms``: the LayerNorms of a block (made trainable with ``train_layernorm=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import TargetError


@dataclass(frozen=True)
class AdapterSites:
    attn_out: str
    ffn_out: str
    attn_in: str
    ffn_in: str
    norms: str


_BERT = AdapterSites(
    attn_out=r".*encoder\.layer\.(\d+)\.attention\.output\.dense",
    ffn_out=r".*encoder\.layer\.(\d+)\.output\.dense",
    attn_in=r".*encoder\.layer\.(\d+)\.attention\.self",
    ffn_in=r".*encoder\.layer\.(\d+)\.intermediate",
    norms=r".*encoder\.layer\.(\d+)\.(attention\.output\.LayerNorm|output\.LayerNorm)",
)
_LLAMA = AdapterSites(
    attn_out=r".*layers\.(\d+)\.self_attn\.o_proj",
    ffn_out=r".*layers\.(\d+)\.mlp\.down_proj",
    attn_in=r".*layers\.(\d+)\.self_attn",
    ffn_in=r".*layers\.(\d+)\.mlp",
    norms=r".*layers\.(\d+)\.(input_layernorm|post_attention_layernorm)",
)

ARCHITECTURES: dict[str, AdapterSites] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": AdapterSites(
        attn_out=r".*h\.(\d+)\.attn\.c_proj",
        ffn_out=r".*h\.(\d+)\.mlp\.c_proj",
        attn_in=r".*h\.(\d+)\.attn",
        ffn_in=r".*h\.(\d+)\.mlp",
        norms=r".*h\.(\d+)\.(ln_1|ln_2)",
    ),
    "opt": AdapterSites(
        attn_out=r".*layers\.(\d+)\.self_attn\.out_proj",
        ffn_out=r".*layers\.(\d+)\.fc2",
        attn_in=r".*layers\.(\d+)\.self_attn",
        ffn_in=r".*layers\.(\d+)\.fc1",
        norms=r".*layers\.(\d+)\.(self_attn_layer_norm|final_layer_norm)",
    ),
}


def sites_for(model_type: str | None, overrides: dict[str, str | None]) -> AdapterSites:
    """The table entry for ``model_type`` with any user overrides applied.

    Raises:
        TargetError: unknown architecture and no overrides; says which config fields to set.
    """
    given = {k: v for k, v in overrides.items() if v}
    if model_type in ARCHITECTURES:
        base = ARCHITECTURES[model_type]
        return AdapterSites(**{**base.__dict__, **given})
    missing = [k for k in ("attn_out", "ffn_out") if k not in given]
    if missing:
        raise TargetError(
            f"bottleneck adapters don't know architecture {model_type!r} (known: {', '.join(sorted(ARCHITECTURES))}). "
            f"Name its modules yourself with regexes whose first group is the layer index, e.g. "
            f"AdapterConfig(attn_out=r'.*layers\\.(\\d+)\\.attn\\.out_proj', ffn_out=r'.*layers\\.(\\d+)\\.mlp\\.fc_out'); "
            f"parallel adapters also need attn_in / ffn_in (modules whose input is the sublayer input), "
            f"train_layernorm needs norms."
        )
    return AdapterSites(
        attn_out=given["attn_out"],
        ffn_out=given["ffn_out"],
        attn_in=given.get("attn_in", ""),
        ffn_in=given.get("ffn_in", ""),
        norms=given.get("norms", ""),
    )
