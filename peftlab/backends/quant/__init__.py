"""Quantized bases, one backend each behind :class:`~peftlab.backends.quant.base.QuantBackend`: bitsandbytes
(int8, NF4, FP4), torchao (int8 / int4 weight-only, float8 on CUDA) and FP8 block-scaled checkpoints; streaming
quantized loading and quantizing a model in memory."""

from . import base, bitsandbytes, fp8, torchao  # noqa: F401 (registers the backends)
