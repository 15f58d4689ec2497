"""peftlab: parameter-efficient fine-tuning for Hugging Face transformers.

Public API only. The package is layered, lowest first: ``util``, ``core``, ``backends`` (with ``kernels``),
``methods`` (one package per family, each registering its method), ``serving``, ``api``, ``persist``,
``training``, ``estimator``, then ``cli`` and ``bench``; a layer imports only from itself and the layers below.
"""

from ._version import __version__
from .api import (
    count_parameters,
    delete_adapter,
    disable_adapters,
    is_merged,
    merge,
    on_train_step,
    print_trainable_parameters,
    unmerge,
    unwrap,
    wrap,
)
from .backends.quant.load import load_quantized
from .backends.quant.model import dequantize_model, memory_report, prepare_for_kbit_training, quantize
from .core.activation import active_adapters, list_adapters, set_active_adapters, set_trainable
from .core.config import PeftConfig
from .estimator.estimate import Estimate, estimate
from .methods.adalora import AdaLoraConfig, adalora_orth_loss, adalora_step
from .methods.bottleneck import AdapterConfig
from .methods.lora import LoraConfig
from .methods.prefix import PrefixConfig
from .persist.combine import combine
from .persist.format import load_adapter, save_adapter
from .persist.hf_peft import export_peft, import_peft
from .persist.merged import save_merged
from .persist.quantized_merge import merge_quantized
from .training.memory import disable_gradient_checkpointing, enable_gradient_checkpointing, make_optimizer
from .util.errors import AdapterFileError, ConfigError, MergeError, PeftlabError, TargetError, WrapError
from .util.models import load_model, resolve_model_path

__all__ = [
    "__version__",
    "wrap",
    "unwrap",
    "merge",
    "unmerge",
    "is_merged",
    "on_train_step",
    "disable_adapters",
    "set_active_adapters",
    "active_adapters",
    "list_adapters",
    "delete_adapter",
    "set_trainable",
    "combine",
    "count_parameters",
    "print_trainable_parameters",
    "save_adapter",
    "load_adapter",
    "save_merged",
    "export_peft",
    "import_peft",
    "enable_gradient_checkpointing",
    "disable_gradient_checkpointing",
    "make_optimizer",
    "train_many",
    "TrainJob",
    "Recipe",
    "load_model",
    "load_quantized",
    "quantize",
    "dequantize_model",
    "prepare_for_kbit_training",
    "memory_report",
    "merge_quantized",
    "resolve_model_path",
    "estimate",
    "Estimate",
    "PeftConfig",
    "LoraConfig",
    "AdapterConfig",
    "AdaLoraConfig",
    "PrefixConfig",
    "adalora_step",
    "adalora_orth_loss",
    "PeftlabCallback",
    "PeftlabError",
    "ConfigError",
    "TargetError",
    "MergeError",
    "AdapterFileError",
    "WrapError",
]

# Names whose modules pull in heavy optional dependencies (transformers.trainer_utils imports peft,
# which imports bitsandbytes): imported on first use, so ``import peftlab`` stays fast and silent.
_LAZY = {"PeftlabCallback": ".training.callbacks", "train_many": ".training.many", "TrainJob": ".training.many",
         "Recipe": ".training.many"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
