"""Lowest layer: errors, atomic files and locks, rank/gather helpers, checkpoint readers, packaged models."""
