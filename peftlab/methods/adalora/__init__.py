"""AdaLoRA: LoRA in SVD form with importance-driven rank allocation."""

from .method import AdaLoraConfig, AdaLoraSlot, adalora_orth_loss, adalora_step

__all__ = ["AdaLoraConfig", "AdaLoraSlot", "adalora_orth_loss", "adalora_step"]
