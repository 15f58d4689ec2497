"""PEFT methods, one package per family; importing a family registers its :class:`~peftlab.core.registry.Method`."""

from . import adalora, bottleneck, lora, prefix  # noqa: F401  (registration)
