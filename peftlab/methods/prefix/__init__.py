"""Prefix tuning: trained key/value prefixes at every attention layer."""

from .method import PrefixConfig

__all__ = ["PrefixConfig"]
