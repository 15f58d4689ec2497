"""Serving: mixed batches, every row with its own adapter (routing hooks and the per-layer router)."""
