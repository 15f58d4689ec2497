r"""The model side of :func:`peftlab.estimate`: a config from a name alone, parameters counted on the meta device.

``load_config`` accepts a local model folder (its ``config.json``), a JSON config file, a peftlab short
name (``minilm-l6``, ``smollm2-135m``) or a few well-known hub ids whose configs are built in (no hub
access needed). ``count`` builds the model on ``torch.device("meta")`` (no weight is allocated, so a 70B
config takes seconds) and reads, for a PEFT config, which parameters train and how every linear of every
block is treated: ``frozen``, ``full`` or ``adapted`` (with its rank and the method's
:class:`~peftlab.core.registry.EstimateRules`), quantized or not. Every method-specific count comes from the
method's rules; nothing here knows one method from another.

Quantized storage per weight of shape (d_out, d_in), n = d_out·d_in, from each backend's ``bytes_for``
(:mod:`peftlab.backends.quant`):

    nf4 / fp4 (bitsandbytes):  n/2 packed bytes + absmax: n/64 · 4  (double quant: n/64 · 1 + n/(64·256) · 4 + 256·4)
    int8 (bitsandbytes):       n bytes + d_out · 4 (row scales)
    torchao-int8:              n bytes + d_out · 5 (row scales and int8 zero points)
    torchao-int4:              n/2 bytes + d_out · d_in/64 · 8 (a scale and a zero point per group of 64)
    fp8 (block-scaled e4m3):   n bytes + ⌈d_out/128⌉ · ⌈d_in/128⌉ · 4
    mxfp4 (e2m1, e8m0 scales): d_out · ⌈d_in/32⌉ · 17 (16 packed bytes and one scale byte per block of 32)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.structure import head_module_names
from ..util.errors import ConfigError
from ..util.models import auto_class

#: Configs of well-known models, so the estimator works offline from a name alone.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "max_position_embeddings": 8192, "tie_word_embeddings": True, "hidden_act": "silu",
    },
    "minilm-l6": {
        "model_type": "bert", "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
        "num_attention_heads": 12, "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    },
    "meta-llama/Llama-2-7b-hf": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
    },
    "meta-llama/Meta-Llama-3-8B": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    },
    "meta-llama/Meta-Llama-3-70B": {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    },
    "mistralai/Mistral-7B-v0.1": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
    },
}  # fmt: skip
KNOWN_CONFIGS["llama-2-7b"] = KNOWN_CONFIGS["meta-llama/Llama-2-7b-hf"]
KNOWN_CONFIGS["llama-3-8b"] = KNOWN_CONFIGS["meta-llama/Meta-Llama-3-8B"]
KNOWN_CONFIGS["llama-3-70b"] = KNOWN_CONFIGS["meta-llama/Meta-Llama-3-70B"]
KNOWN_CONFIGS["mistral-7b"] = KNOWN_CONFIGS["mistralai/Mistral-7B-v0.1"]

#: Architecture families the activation rules know (:mod:`peftlab.estimator.activations`).
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "bert": "bert", "roberta": "bert",
            "xlm-roberta": "bert", "electra": "bert"}  # fmt: skip
#: Block path of each family: group 1 = layer index, group 2 = the module path inside the block.
BLOCK_RE = {"llama": r".*layers\.(\d+)\.(.+)", "bert": r".*encoder\.layer\.(\d+)\.(.+)"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: quant name -> (backend, scheme); the estimator's ``quant=`` accepts these.
QUANT_SCHEMES = {
    "nf4": ("bitsandbytes", "nf4"), "fp4": ("bitsandbytes", "fp4"), "int8": ("bitsandbytes", "int8"),
    "torchao-int8": ("torchao", "int8"), "torchao-int4": ("torchao", "int4"), "fp8": ("fp8", "fp8"),
    "mxfp4": ("mxfp4", "mxfp4"),
}  # fmt: skip
QUANTS = (None, *QUANT_SCHEMES)


def load_config(model_or_path: Any):
    """A transformers config from a model, a config, a folder, a JSON file, a short name or a known hub id."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_or_path, nn.Module):
        return model_or_path.config
    if isinstance(model_or_path, PretrainedConfig):
        return model_or_path
    if isinstance(model_or_path, dict):
        data = dict(model_or_path)
        return AutoConfig.for_model(data.pop("model_type"), **data)
    name = str(model_or_path)
    path = Path(name)
    if path.is_file():
        try:
            return load_config(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise ConfigError(f"{path} is not a JSON model config with a model_type: {exc}") from None
    if path.is_dir() and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path))
    if name in KNOWN_CONFIGS:
        return load_config(KNOWN_CONFIGS[name])
    raise ConfigError(
        f"no config for model {name!r}: give a local model folder, a JSON config file (with model_type), "
        f"or one of the built-in names: {', '.join(sorted(KNOWN_CONFIGS))}"
    )


def default_kind(config) -> str:
    return "causal-lm" if FAMILIES.get(config.model_type) == "llama" else "seq-cls"


def meta_model(config, kind: str) -> nn.Module:
    """The model built on the meta device (shapes only), with sdpa attention."""
    import warnings


    config = type(config).from_dict(config.to_dict())
    if kind in ("seq-cls", "token-cls") and not getattr(config, "num_labels", None):
        config.num_labels = 2
    config._attn_implementation = "sdpa"
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto_class(kind).from_config(config)


def quantized_bytes(d_out: int, d_in: int, quant: str, double_quant: bool = True, blocksize: int = 64) -> int:
    """Bytes of one quantized weight (module docstring), as its backend stores it."""
    from ..backends.quant.base import get_backend

    backend, scheme = QUANT_SCHEMES[quant]
    return get_backend(backend).bytes_for(d_out, d_in, scheme, double_quant=double_quant, blocksize=blocksize)


@dataclass
class Linear:
    """One linear of a block: dims, how it trains (frozen / full / adapted: ``rules`` of the method that adapts
    it, with rank r), quantized base."""

    d_in: int
    d_out: int
    kind: str = "frozen"
    r: int = 0
    rules: Any = None
    quantized: bool = False
    four_bit: bool = False  # NF4/FP4: LoRA training runs the fused dequantize-in-function path


@dataclass
class Counts:
    """What :func:`count` reads off the meta model (parameter counts in elements, bytes where said)."""

    family: str
    config: Any
    kind: str
    n_layers: int
    total_params: int = 0
    trainable_params: int = 0
    frozen_bytes: int = 0
    adapter_bytes: int = 0
    trainable_bytes: int = 0
    trainable_numels: list[int] = field(default_factory=list)  # one entry per trainable tensor
    blocks: list[dict[str, Linear]] = field(default_factory=list)  # per layer: {role: Linear}
    adapter_sites: list[dict[str, int]] = field(
        default_factory=list
    )  # per layer: {"attn"/"ffn": bottleneck m}
    embeddings_train: bool = False
    norms_train: bool = False
    head_trains: bool = False
    tied_head: bool = False
    largest_quantized: int = 0  # elements of the largest quantized weight (its dequantized copy is transient)
    matmul_params: int = 0  # weights of the block linears (forward GEMM FLOPs = 2 · tokens · this)
    head_params: int = 0
    prefix_tokens: int = 0
    other: dict[str, Linear] = field(default_factory=dict)  # linears outside the blocks (pooler, heads)
    late_grad_bytes: int = 0  # gradients that arrive after every block's backward (untied embeddings)
    late_numels: int = 0  # adapter elements among ``trainable_numels`` whose gradients arrive that late
    rules: Any = None  # the method's EstimateRules (None: full fine-tuning)
    notes: dict[str, Any] = field(default_factory=dict)  # what the rules' extra_params noted for their other hooks


def _suffix_match(path: str, names) -> bool:
    return any(path == n or path.endswith("." + n) or n in path.split(".") for n in names or [])


def count(config, kind: str, rules, peft_config, precision: str, quant: str | None,
          double_quant: bool = True) -> Counts:  # fmt: skip
    """Parameter counts and per-block linear kinds for ``peft_config`` counted with its method's ``rules``
    (:class:`~peftlab.core.registry.EstimateRules`; ``rules=None``: full fine-tuning)."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ConfigError(
            f"the estimator knows model types {', '.join(sorted(FAMILIES))}, not {config.model_type!r}"
        )
    e = torch.finfo(DTYPES[precision]).bits // 8
    model = meta_model(config, kind)
    heads = head_module_names(model)
    out = Counts(family=family, config=config, kind=kind, n_layers=config.num_hidden_layers, rules=rules)
    block_re = re.compile(BLOCK_RE[family])
    out.blocks = [{} for _ in range(out.n_layers)]
    out.adapter_sites = [{} for _ in range(out.n_layers)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out.tied_head = bool(head is not None and head.weight is model.get_input_embeddings().weight)
    to_save = [] if peft_config is None else list(peft_config.modules_to_save or [])

    full_ft = rules is None
    targets: dict[str, Linear] = {}
    if not full_ft and rules.adapted_linears is not None:
        skip = [p for p, _ in model.named_modules() if p and _suffix_match(p, to_save)]
        for path, r in rules.adapted_linears(model, peft_config, skip).items():
            mod = model.get_submodule(path)
            targets[path] = Linear(mod.in_features, mod.out_features, "adapted", r, rules)

    seen: set[int] = set()
    for path, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{path}.{pname}" if path else pname
            n = p.numel()
            out.total_params += n
            is_linear = isinstance(module, nn.Linear) and pname == "weight"
            quantized = bool(quant) and is_linear and path not in heads and not _suffix_match(path, to_save)
            quantized = quantized and not (out.tied_head and p is model.get_input_embeddings().weight)
            trains = full_ft or _suffix_match(full, to_save)
            if not full_ft and rules.trains_base is not None and rules.trains_base(peft_config, path, pname, path in targets):
                trains = True
            if trains:
                out.trainable_params += n
                out.trainable_bytes += n * e
                out.trainable_numels.append(n)
                out.adapter_bytes += 0 if full_ft else n * e
                out.frozen_bytes += n * e if full_ft else 0
                out.head_trains |= path in heads
                out.embeddings_train |= isinstance(module, nn.Embedding)
                if "embed" in path and not (out.tied_head and p is model.get_input_embeddings().weight):
                    out.late_grad_bytes += n * e
                out.norms_train |= "norm" in type(module).__name__.lower()
            elif quantized:
                out.frozen_bytes += quantized_bytes(p.shape[0], p.shape[1], quant, double_quant)
                out.largest_quantized = max(out.largest_quantized, n)
            else:
                out.frozen_bytes += n * e
            if is_linear:
                lin = targets.get(path) or Linear(p.shape[1], p.shape[0], "full" if trains else "frozen")
                lin.quantized = quantized
                lin.four_bit = quantized and quant != "int8"  # every backend but bitsandbytes int8 runs fused
                m = block_re.fullmatch(path)
                if m:
                    out.blocks[int(m.group(1))][m.group(2)] = lin
                    out.matmul_params += n
                else:
                    out.other[path] = lin
    if out.tied_head:
        out.head_trains = full_ft
    out.head_params = head.weight.numel() if head is not None and kind == "causal-lm" else 0

    a_bytes = (
        4 if (quant or e < 4) else e
    )  # adapters train in fp32 on half/quantized bases (lora.adapter_dtype)
    extra: list[int] = []
    for lin in targets.values():
        extra += rules.linear_params(lin.r, lin.d_in, lin.d_out)
    if not full_ft and rules.extra_params is not None:
        extra += rules.extra_params(model, peft_config, out)
    ab = e if not full_ft and rules.params_in_model_dtype else a_bytes
    for n in extra:
        out.trainable_params += n
        out.total_params += n
        out.trainable_bytes += n * ab
        out.adapter_bytes += n * ab
        out.trainable_numels.append(n)
    out.late_grad_bytes += out.late_numels * ab
    return out


