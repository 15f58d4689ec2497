"""Compute backends under the methods: the LoRA autograd ops (torch and the Triton kernels of
:mod:`peftlab.kernels`) and quantized base layers."""
