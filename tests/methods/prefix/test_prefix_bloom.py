"""Prefix tuning on BLOOM, whose attention computes its own ALiBi instead of calling transformers' attention
interface: the prefix starts the model's KV cache and the attention mask gets n leading columns, the route HF PEFT
takes. Checked against HF PEFT itself on a left-padded batch (logits); greedy generation with the cache equals
generation that recomputes everything each step (HF PEFT 0.21's own generate raises on BLOOM's prefix: its
prefill expands a mask of the prompt's length against keys that include the prefix)."""

from __future__ import annotations

import pytest
import torch
from arch_zoo import build

import peftlab
from helpers import perturb

peft = pytest.importorskip("peft")


def _left_padded():
    ids = torch.tensor([[0, 0, 5, 17, 33, 8], [12, 40, 7, 3, 9, 21]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_bloom_prefix_equals_hf_peft_on_left_padding_and_in_generate(tmp_path):
    model = peftlab.wrap(build("BLOOM"), peftlab.PrefixConfig(num_virtual_tokens=3, projection_dim=8))
    perturb(model, 0.5)
    x = _left_padded()
    peftlab.export_peft(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build("BLOOM"), str(tmp_path)).eval()
    with torch.no_grad():
        ours = model(**x).logits
        with peftlab.disable_adapters(model):
            base = model(**x).logits
        real = x["attention_mask"].bool()
        assert (ours - base)[real].abs().max() > 1e-3
        torch.testing.assert_close(theirs(**x).logits[real], ours[real], rtol=0, atol=1e-5)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
              output_scores=True)  # fmt: skip
    with torch.no_grad():
        cached, uncached = model.generate(**x, **kw), model.generate(**x, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, (sa, sb) in enumerate(zip(cached.scores, uncached.scores)):
        torch.testing.assert_close(sa, sb, rtol=0, atol=1e-5, msg=f"step {step}")
    try:  # HF PEFT is unpinned: once its generate runs here, it must agree with ours
        with torch.no_grad():
            peer = theirs.generate(**x, **kw)
    except RuntimeError:
        return
    assert torch.equal(peer.sequences, cached.sequences)
