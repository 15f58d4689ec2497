"""The public, method-agnostic API: wrap, unwrap, merge, unmerge, disable, parameter counts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .config import PeftConfig
from .errors import ConfigError, MergeError
from .inject import STATE_ATTR, adapters, get_state, inject, replace_module, wrapped_layers
from .registry import get_method


def wrap(model: nn.Module, config: PeftConfig) -> nn.Module:
    """Add a PEFT adapter to ``model`` in place and return the same object.

    The base weights are frozen; only the adapter's parameters (and ``modules_to_save``)
    stay trainable. The model remains a plain ``transformers`` model, so ``Trainer``,
    ``accelerate`` and ``generate`` work unchanged.

    Raises:
        ConfigError: ``config`` is not a peftlab config.
        TargetError: target modules not found (the message lists candidates).
        WrapError: an adapter with this name is already on the model.
    """
    if not isinstance(config, PeftConfig):
        raise ConfigError(
            f"wrap() needs a peftlab config (e.g. peftlab.LoraConfig), got {type(config).__name__}"
        )
    inject(model, config, get_method(config.method))
    return model


def merge(model: nn.Module, adapter_name: str | None = None, safe: bool = False) -> nn.Module:
    """Fold the adapter into the base weights (W <- W + ΔW). Merging twice is an error.

    Args:
        safe: check every merged weight for NaN/inf before writing it (slower; raises MergeError).
    """
    state = get_state(model, adapter_name)
    method = get_method(state.config.method)
    if method.merge is not None:
        method.merge(model, state)
        return model
    layers = [layer for _, layer in wrapped_layers(model, state.config.adapter_name)]
    if layers and all(layer.merged for layer in layers):
        raise MergeError(f"adapter {state.config.adapter_name!r} is already merged; call unmerge() first")
    if safe:  # check every layer before touching any weight, so a failure leaves the model as it was
        for layer in layers:
            layer.check_safe_merge()
    for layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Subtract a merged adapter from the base weights again. Unmerging an unmerged model is an error."""
    state = get_state(model, adapter_name)
    method = get_method(state.config.method)
    if method.unmerge is not None:
        method.unmerge(model, state)
        return model
    layers = [layer for _, layer in wrapped_layers(model, state.config.adapter_name)]
    if not any(layer.merged for layer in layers):
        raise MergeError(f"adapter {state.config.adapter_name!r} is not merged; nothing to unmerge")
    for layer in layers:
        layer.unmerge()
    return model


def is_merged(model: nn.Module, adapter_name: str | None = None) -> bool:
    state = get_state(model, adapter_name)
    method = get_method(state.config.method)
    if method.is_merged is not None:
        return method.is_merged(state)
    return any(layer.merged for _, layer in wrapped_layers(model, state.config.adapter_name))


def on_train_step(model: nn.Module, step: int) -> None:
    """Call once per optimizer step, after ``optimizer.step()`` and before ``zero_grad()``.

    Runs each adapter method's per-step hook (e.g. AdaLoRA's importance update and rank
    allocation); a no-op for methods that have none. peftlab's training loop and its
    ``transformers.TrainerCallback`` call it for you.
    """
    for state in adapters(model).values():
        method = get_method(state.config.method)
        if method.on_step is not None:
            method.on_step(model, state, step)


def unwrap(
    model: nn.Module, merge: bool = False, adapter_name: str | None = None, dequantize: bool = False
) -> nn.Module:
    """Remove the adapter(s) and return the plain model (the same object).

    Args:
        merge: fold the adapter into the base weights first (if not merged already). With
            ``merge=False`` a merged adapter is unmerged, so the base weights are restored.
        adapter_name: remove only this adapter (default: all of them).
        dequantize: replace quantized (bitsandbytes) base layers by full-precision ones first,
            so that ``merge=True`` gives a plain full-precision merged model.
    """
    if dequantize:
        from .quant import dequantize_model

        dequantize_model(model)
    names = [adapter_name] if adapter_name else list(adapters(model))[::-1]
    if not names:
        get_state(model)  # raises the "not wrapped" error
    for name in names:
        state = get_state(model, name)
        method = get_method(state.config.method)
        if merge and not method.folds_into_base:
            raise MergeError(
                f"{state.config.method} adapters can't be folded into the base weights; unwrap(merge=False) removes "
                f"the adapter, or keep it wrapped for inference"
            )
        merged = is_merged(model, name)
        if merge and not merged:
            globals()["merge"](model, name)
        elif not merge and merged:
            unmerge(model, name)
        if method.remove is not None:
            method.remove(model, name)
        else:
            for path, layer in list(wrapped_layers(model, name)):
                replace_module(model, path, layer.base_layer)
        for pname, p in model.named_parameters():
            if pname in state.orig_requires_grad:
                p.requires_grad_(state.orig_requires_grad[pname])
        states = dict(adapters(model))
        states.pop(name)
        if states:
            setattr(model, STATE_ATTR, states)
        else:
            delattr(model, STATE_ATTR)
    return model


def set_adapters_enabled(model: nn.Module, enabled: bool, adapter_name: str | None = None) -> None:
    names = [adapter_name] if adapter_name else list(adapters(model))
    for name in names:
        state = get_state(model, name)
        method = get_method(state.config.method)
        if method.set_enabled is not None:
            method.set_enabled(model, name, enabled)
        for _, layer in wrapped_layers(model, name):
            layer.enabled = enabled


@contextlib.contextmanager
def disable_adapters(model: nn.Module, adapter_name: str | None = None) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes exactly the base model.

    A merged adapter cannot be disabled (its update lives in the base weights): unmerge first.
    """
    names = [adapter_name] if adapter_name else list(adapters(model))
    if not names:
        get_state(model)
    for name in names:
        if is_merged(model, name):
            raise MergeError(
                f"adapter {name!r} is merged into the base weights; unmerge() before disabling it"
            )
    set_adapters_enabled(model, False, adapter_name)
    try:
        yield model
    finally:
        set_adapters_enabled(model, True, adapter_name)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters are counted once.

    For bitsandbytes 4-bit weights (packed two values per byte) the logical count is used.
    """
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if type(p).__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return ``trainable params: X || all params: Y || trainable%: Z``."""
    trainable, total = count_parameters(model)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    print(line)
    return line
