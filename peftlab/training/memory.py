"""Memory options for adapter training: gradient checkpointing on a frozen base, 8-bit / paged AdamW.

Gradient checkpointing keeps only each decoder block's input (B, T, H) and recomputes the block in
backward, trading about one extra forward for the saved activations of attention and MLP. With a
frozen base the embedding output does not require grad, so a reentrant checkpoint would see no
input that needs grad and silently drop the adapters' gradients; :func:`enable_gradient_checkpointing`
therefore makes the input embeddings' output require grad in that mode. The non-reentrant checkpoint (the
default) needs no such hook, and goes without it: the hook would make autograd compute the first block's
input gradient (the q/k/v GEMMs' dX), which a frozen embedding never uses.

``selective=True`` (non-reentrant only) keeps the outputs of the matmuls and of attention (mm, addmm,
bmm, SDPA) and recomputes only the cheap element-wise work in backward: norms, rotary embeddings, SiLU
and gating products, residual adds. The GEMMs are never run twice, so the step costs a few percent more
instead of a whole extra forward, while the element-wise intermediates (about half of a decoder block's
saved activations) are freed.

:func:`make_optimizer` builds AdamW over the trainable parameters. ``"adamw8bit"`` keeps both Adam
moments m, v (Loshchilov & Hutter: θ ← θ - lr·(m̂/(√v̂ + ε) + λθ)) in blockwise-quantised uint8
(bitsandbytes, Dettmers et al. 2022): 2 bytes per parameter instead of 8. ``"paged_*"`` variants
page the states to host memory under GPU memory pressure (CUDA only; on a CPU bitsandbytes falls
back to unpaged states).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ..util.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit", "paged_adamw32bit")
_BNB_CLASSES = {
    "adamw8bit": "AdamW8bit",
    "paged_adamw": "PagedAdamW",
    "paged_adamw8bit": "PagedAdamW8bit",
    "paged_adamw32bit": "PagedAdamW32bit",
}


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers PreTrainedModel inside ``model`` (itself, or an HF PEFT wrapper's base)."""
    for candidate in (
        model,
        getattr(model, "base_model", None),
        getattr(getattr(model, "base_model", None), "model", None),
    ):
        if candidate is not None and hasattr(candidate, "supports_gradient_checkpointing"):
            return candidate
    raise ConfigError(
        f"{type(model).__name__} is not a transformers PreTrainedModel; gradient checkpointing here needs one "
        "(a model from transformers' from_pretrained / peftlab.load_model, optionally wrapped by peftlab.wrap)"
    )


def _saved_ops() -> set:
    aten = torch.ops.aten
    names = [
        "mm",
        "addmm",
        "addmm_",
        "bmm",
        "baddbmm",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    ]
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


def _keep_matmuls(ctx, op, *args, **kwargs):
    """Selective-checkpoint policy: save matmul and attention outputs, recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _keep_matmuls.ops:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_keep_matmuls.ops = _saved_ops()


def enable_gradient_checkpointing(
    model: nn.Module, use_reentrant: bool = False, every_n_layers: int = 1, selective: bool = False
) -> nn.Module:
    """Checkpoint every ``every_n_layers``-th decoder block of ``model`` and make its inputs require grad.

    Works on a frozen base wrapped by :func:`peftlab.wrap`: adapter parameters inside the blocks get their
    gradients through the recomputation. ``selective=True`` recomputes only element-wise ops (see the
    module docstring). Returns ``model``.
    """
    if every_n_layers < 1:
        raise ConfigError(f"every_n_layers must be an integer >= 1, got {every_n_layers!r}")
    if selective and use_reentrant:
        raise ConfigError(
            "selective checkpointing needs use_reentrant=False (torch's selective checkpoint contexts)"
        )
    hf = _transformers_model(model)
    if not hf.supports_gradient_checkpointing:
        raise ConfigError(
            f"{type(hf).__name__} does not support gradient checkpointing (transformers sets "
            "supports_gradient_checkpointing=False for it); train without it or pick another model"
        )
    kwargs = {"use_reentrant": bool(use_reentrant)}
    if selective:
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        # peftlab's LoRA adds x·Aᵀ·Bᵀ into the base GEMM's output in place (addmm_), so the cached GEMM output
        # is mutated on purpose; addmm_ is itself "saved", so recomputation returns the final tensor instead
        # of adding the LoRA term twice (tests compare gradients with and without checkpointing).
        kwargs["context_fn"] = functools.partial(
            create_selective_checkpoint_contexts, _keep_matmuls, allow_cache_entry_mutation=True
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if hasattr(hf, "activation_checkpointing_enable"):
            hf.activation_checkpointing_enable(
                activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers
            )
        else:  # transformers < 5
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers adds the input-grad hook whatever the mode; only the reentrant checkpoint needs it
    if use_reentrant and not getattr(hf, "_require_grads_hooks", None):
        hf.enable_input_require_grads()
    elif not use_reentrant and getattr(hf, "_require_grads_hooks", None):
        hf.disable_input_require_grads()
    if getattr(hf.config, "use_cache", False):
        hf._peftlab_use_cache = True  # restored by disable_gradient_checkpointing
        hf.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation
    return model


def disable_gradient_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`enable_gradient_checkpointing` (the input-grad hooks are removed too)."""
    hf = _transformers_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if hasattr(hf, "activation_checkpointing_disable"):
            hf.activation_checkpointing_disable()
        else:
            hf.gradient_checkpointing_disable()
    hf.disable_input_require_grads()
    if getattr(hf, "_peftlab_use_cache", False):
        hf.config.use_cache = True
        del hf._peftlab_use_cache
    return model


def bitsandbytes_available() -> bool:
    """True when bitsandbytes' optimizers can be imported."""
    try:
        import bitsandbytes.optim  # noqa: F401
    except Exception:  # bitsandbytes raises various errors on unsupported platforms
        return False
    return True


def make_optimizer(
    model_or_params: nn.Module | Iterable[torch.nn.Parameter],
    name: str = "adamw",
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    fallback: bool = False,
    **kwargs,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; ``name`` one of :data:`OPTIMIZERS`.

    ``fallback=True`` uses torch's AdamW (with a warning) when bitsandbytes is missing, instead of raising.
    Extra ``kwargs`` (betas, eps, ...) go to the optimizer.
    """
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    if lr <= 0:
        raise ConfigError(f"lr must be > 0, got {lr!r}")
    if isinstance(model_or_params, nn.Module):
        params = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        params = [p for p in model_or_params if p.requires_grad]
    if not params:
        raise ConfigError(
            "no trainable parameters: wrap the model (peftlab.wrap) or unfreeze some parameters first"
        )
    if name != "adamw":
        if bitsandbytes_available():
            import bitsandbytes.optim as bnb_optim

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
                return getattr(bnb_optim, _BNB_CLASSES[name])(
                    params, lr=lr, weight_decay=weight_decay, **kwargs
                )
        if not fallback:
            raise ConfigError(
                f"optimizer {name!r} needs bitsandbytes, which is not importable here; "
                "pip install bitsandbytes, use name='adamw', or pass fallback=True"
            )
        warnings.warn(f"bitsandbytes unavailable: using torch AdamW instead of {name!r}", stacklevel=2)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)


# ---- memory accounting rules: peftlab.estimate counts with these; tests/estimator/test_estimate.py checks them ----------
# ---- against what the checkpoint contexts above actually keep (keep the two in step) ---------------------------

#: Ops whose outputs ``selective=True`` keeps (the names behind :func:`_keep_matmuls`'s ``ops``).
SELECTIVE_KEEPS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "scaled_dot_product_attention")


def checkpoint_kept_bytes(block_input: int, gemm_outputs: int, selective: bool) -> int:
    """Bytes one checkpointed block holds from its forward until its backward.

    Both modes keep the block's input (the recomputation starts from it); ``selective=True`` also keeps the
    output of every op in :data:`SELECTIVE_KEEPS` (GEMMs and attention, logsumexp included), frozen GEMMs too.
    Everything else is recomputed: one block's worth at a time, during that block's backward.
    """
    return block_input + (gemm_outputs if selective else 0)
