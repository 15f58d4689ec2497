"""``transformers.Trainer`` integration: one callback runs peftlab's per-step hooks (AdaLoRA)."""

from __future__ import annotations

from transformers import TrainerCallback

from .api import on_train_step


class PeftlabCallback(TrainerCallback):
    """Calls :func:`peftlab.on_train_step` after each optimizer step, before gradients are zeroed.

    ``Trainer(model=wrapped, ..., callbacks=[peftlab.PeftlabCallback()])``; needed for AdaLoRA.
    """

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            on_train_step(model, state.global_step)
        return control
