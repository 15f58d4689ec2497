"""Bottleneck adapters: Houlsby, Pfeiffer and parallel placements."""

from .method import AdapterConfig, BottleneckSlot

__all__ = ["AdapterConfig", "BottleneckSlot"]
