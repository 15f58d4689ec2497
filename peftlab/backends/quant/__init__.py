"""Quantized bases: bitsandbytes layers (int8, NF4, FP4), streaming quantized loading, quantizing a model."""
