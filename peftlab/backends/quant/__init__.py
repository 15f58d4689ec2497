"""Quantized bases, one backend each behind :class:`~peftlab.backends.quant.base.QuantBackend`: bitsandbytes
(int8, NF4, FP4), torchao (int8 / int4 weight-only, float8 on CUDA) FP8 block-scaled checkpoints and MXFP4
(GPT-OSS's e2m1 blocks with e8m0 scales); streaming
quantized loading and quantizing a model in memory."""

from . import base, bitsandbytes, fp8, mxfp4, torchao  # noqa: F401 (registers the backends)
