"""LoRA and its variants: DoRA, rsLoRA, PiSSA / OLoRA / LoftQ initialisations."""

from .config import LoraConfig
from .method import examples, inject_lora
from .slot import LoraSlot, lora_layer

__all__ = ["LoraConfig", "LoraSlot", "examples", "inject_lora", "lora_layer"]
