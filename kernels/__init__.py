"""Fused LoRA kernels (Triton), shipped as ``peftlab.kernels``.

``triton_available()`` tells whether the Triton path can run; ``lora_linear`` is the fused
LoRA linear (see ``peftlab.kernels.lora``); ``peftlab.kernels.reference`` holds pure-torch
references of every kernel.
"""


def triton_available() -> bool:
    """True when Triton imports (the kernels also need CUDA tensors, or TRITON_INTERPRET=1)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
