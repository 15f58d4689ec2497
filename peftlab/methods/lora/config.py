"""``LoraConfig``: LoRA's hyper-parameters (and its variants': DoRA, rsLoRA, PiSSA/OLoRA/LoftQ inits)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ...core.config import PeftConfig, check_bool, check_int, check_number
from ...util.errors import ConfigError
from .inits import check_config
from .tokens import check_token_indices

BIAS_OPTIONS = ("none", "all", "lora_only")


@dataclass
class LoraConfig(PeftConfig):
    r"""LoRA hyper-parameters.

    Args:
        r: rank of the update (> 0).
        alpha: scaling numerator (> 0); the update is scaled by alpha/r (or alpha/sqrt(r)).
        dropout: dropout on the adapter input, in [0, 1).
        use_rslora: rank-stabilised scaling alpha/sqrt(r) (Kalajievski, 2023).
        bias: "none", "all" (every bias in the model trains) or "lora_only" (biases of the
            adapted layers train).
        rank_pattern / alpha_pattern: per-module overrides, ``{name_or_regex: value}``; a key
            matches a module path when ``re.match(rf"(.*\.)?({key})$", path)`` does.
        use_kernel: "auto" (Triton on CUDA when importable, torch otherwise), "triton" or "torch".
        use_dora: weight-decomposed LoRA (DoRA, :mod:`peftlab.methods.lora.dora`): a trained magnitude per
            output unit times the row-normalised W + s·B A.
        init: "default" (Kaiming A, zero B), "gaussian", "pissa", "pissa_niter_N", "olora", "loftq" or
            "loftq_iter_N" (:mod:`peftlab.methods.lora.inits`).
        target_parameters: parameters that take a per-expert LoRA in place (3-D expert stacks of MoE blocks, a
            router's weight; :mod:`peftlab.methods.lora.params`), as names or dotted suffixes
            (``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``). With ``target_modules=None`` only these
            are adapted (HF PEFT's semantics). Needs dropout 0, no DoRA, init "default" or "gaussian".
        trainable_token_indices: rows of an embedding that train in full, beside the LoRA (HF PEFT's option; new
            tokens' embeddings): a list of token ids (the input embeddings') or ``{embedding name: ids}``. A tied
            output head gets the same rows. Only those rows are saved (:mod:`peftlab.methods.lora.tokens`).
    """

    method = "lora"

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    use_rslora: bool = False
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_kernel: str = "auto"
    use_dora: bool = False
    init: str = "default"
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("LoRA", "rank r", self.r, low=1)
        check_number("LoRA", "alpha", self.alpha, low=0, low_open=True)
        check_number("LoRA", "dropout", self.dropout, low=0, high=1, high_open=True)
        check_bool("LoRA", "use_rslora", self.use_rslora)
        if self.bias not in BIAS_OPTIONS:
            raise ConfigError(f"LoRA bias must be one of {BIAS_OPTIONS}, got {self.bias!r}")
        if self.use_kernel not in ("auto", "triton", "torch"):
            raise ConfigError(f"use_kernel must be 'auto', 'triton' or 'torch', got {self.use_kernel!r}")
        for field_name in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, field_name), dict):
                raise ConfigError(f"LoRA {field_name} must be a dict {{module name or regex: value}}, got {getattr(self, field_name)!r}")
        for key, value in self.rank_pattern.items():
            check_int("LoRA", f"rank_pattern[{key!r}]", value, low=1)
        for key, value in self.alpha_pattern.items():
            check_number("LoRA", f"alpha_pattern[{key!r}]", value, low=0, low_open=True)
        check_bool("LoRA", "use_dora", self.use_dora)
        self.target_parameters = check_target_parameters(self.target_parameters)
        self.trainable_token_indices = check_token_indices(self.trainable_token_indices)
        if self.target_parameters:
            bad = [f for f, bad in (("dropout", self.dropout != 0), ("use_dora", self.use_dora),
                                    ("init", self.init not in ("default", "gaussian"))) if bad]  # fmt: skip
            if bad:
                raise ConfigError(
                    f"LoRA target_parameters cannot go with {', '.join(f'{f}={getattr(self, f)!r}' for f in bad)}: a "
                    f"parameter's LoRA is folded into the weight before the module runs, so there is no input to drop "
                    f"out and no output norm (as in HF PEFT); use dropout=0, use_dora=False, init 'default' or 'gaussian'"
                )

        check_config(self)

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """Rank and alpha for the module at ``path`` after the per-module patterns."""
        return pattern_value(self.rank_pattern, path, self.r), pattern_value(
            self.alpha_pattern, path, self.alpha
        )

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def pattern_value(pattern: dict[str, Any], path: str, default: Any) -> Any:
    """The value of the first key of ``pattern`` that matches ``path`` as HF PEFT does."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def check_target_parameters(value) -> list[str] | None:
    """``target_parameters``: None or a non-empty list of parameter names / dotted suffixes."""
    if value is None:
        return None
    if isinstance(value, (tuple, set)):
        value = sorted(value) if isinstance(value, set) else list(value)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            f"target_parameters must be a non-empty list of parameter names (a name matches a parameter path equal "
            f"to it or ending in '.' + name), e.g. ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']; got {value!r}"
        )
    return value
