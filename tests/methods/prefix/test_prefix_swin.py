"""Prefix tuning on Swin: stages of different widths, windowed attention with a relative-position bias and the
shifted-window mask.

Swin's config has per-stage ``num_heads`` and a hidden size that doubles per stage, so no one (heads, head dim)
fits every layer; HF PEFT's prefix reads one ``num_attention_heads`` and can't size a table for it. Ours takes the
envelope (most heads, widest head dim) and each layer reads its own first heads and head-dim columns. Every window
(Swin's attention batch is batch × windows) attends to the layer's n prefix tokens beside its own tokens.

The reference prepends the prefix in Swin's own eager attention function, patched in place of ours, with the
prefix columns added to whatever bias and mask Swin passes: an independent path to the same attention.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers.models.swin import modeling_swin

import peftlab
from helpers import perturb
from peftlab.methods.prefix.attention import PREFIX_HOLDER_ATTR

CONFIGS = {
    # stage 0: 1 head of 16, stage 1: 2 heads of 16 (more heads in the later stage, as every released Swin)
    "heads-grow": dict(embed_dim=16, num_heads=[1, 2]),
    # stage 0: 2 heads of 8, stage 1: 2 heads of 16 (the head dim grows)
    "dim-grows": dict(embed_dim=16, num_heads=[2, 2]),
}


def build(layout: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.SwinConfig(image_size=32, patch_size=4, depths=[2, 1], window_size=4, num_labels=3,
                           **CONFIGS[layout])  # fmt: skip
    return tf.SwinForImageClassification(config).eval()


def _reference(model: torch.nn.Module, layer_kv, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The base Swin with layer i's prefix (K_i, V_i), each (kv_heads, n, head_dim), prepended in eager attention."""
    base = model  # the same weights; the prefix wrapper is switched off so only the patched function prepends
    attention = [m for m in base.modules() if type(m).__name__ == "SwinAttention"]
    index = {id(m): i for i, m in enumerate(attention)}
    original = modeling_swin.eager_attention_forward

    def eager_with_prefix(module, query, key, value, mask, **kwargs):
        k, v = layer_kv(index[id(module)])
        heads, dim = key.shape[1], key.shape[-1]
        k = k[:heads, :, :dim].unsqueeze(0).expand(key.shape[0], -1, -1, -1)
        v = v[:heads, :, :dim].unsqueeze(0).expand(value.shape[0], -1, -1, -1)
        n = k.shape[2]
        mask = torch.cat([torch.zeros(*mask.shape[:-1], n, dtype=mask.dtype), mask], dim=-1)
        return original(module, query, torch.cat([k, key], 2), torch.cat([v, value], 2), mask, **kwargs)

    monkeypatch.setattr(modeling_swin, "eager_attention_forward", eager_with_prefix)
    base.set_attn_implementation("eager")
    with torch.no_grad(), peftlab.disable_adapters(base):
        return base(pixel_values=x).logits


@pytest.mark.parametrize("layout", list(CONFIGS))
def test_swin_prefix_equals_keys_prepended_in_every_window(layout, monkeypatch):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = peftlab.wrap(build(layout), peftlab.PrefixConfig(num_virtual_tokens=3))
    perturb(model, 0.5)
    holder = getattr(model, PREFIX_HOLDER_ATTR)
    with torch.no_grad():
        ours = model(pixel_values=x).logits
        layer_kv = holder.layer_kv
        with peftlab.disable_adapters(model):
            base = model(pixel_values=x).logits
    assert (ours - base).abs().max() > 1e-3, "the prefix changed nothing"
    shifted = [m for m in model.modules() if type(m).__name__ == "SwinLayer" and m.shift_size > 0]
    assert shifted, "the config must exercise the shifted-window mask"
    ref = _reference(model, layer_kv, x, monkeypatch)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_swin_prefix_table_is_the_widest_stage_and_narrow_layers_get_no_gradient_outside_their_width():
    """heads-grow: the table holds 2 heads of 16 per layer; stage 0's one-head layers train head 0 only, stage 1's
    layer both heads."""
    from peftlab.methods.prefix.attention import PREFIX_TABLES_ATTR

    model = peftlab.wrap(build("heads-grow"), peftlab.PrefixConfig(num_virtual_tokens=3))
    table = getattr(model, PREFIX_TABLES_ATTR)["default"].embedding.weight  # (n, L·2·d_kv), d_kv = 2·16
    assert table.shape == (3, 3 * 2 * 32)
    model.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model(pixel_values=x).logits.square().sum().backward()
    per_head = table.grad.view(3, 3, 2, 2, 16).abs().sum(dim=(0, 4))  # (layer, K/V, head)
    assert (per_head[:2, :, 1] == 0).all() and (per_head[:2, :, 0] > 0).all()  # stage 0: head 0 only
    assert (per_head[2] > 0).all()  # stage 1: both heads
