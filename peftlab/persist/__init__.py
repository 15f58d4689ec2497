"""Adapters on disk: our format, HF PEFT's format, merged checkpoints (plain, sharded, quantized), combine."""
