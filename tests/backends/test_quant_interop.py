"""HF PEFT loads an adapter exported from each quantized base (issue #33) over a base quantized the same way and
gives our logits: bitsandbytes NF4 / FP4 / int8, torchao int8 / int4, MXFP4. peft cannot target our own Fp8BlockLinear
(no nn.Linear), which this file records. transformers' FP8Linear is an nn.Linear that peft wraps, but its forward
needs the `kernels` package's CUDA kernel, so peft's side cannot run it on a CPU (not checked here)."""

from __future__ import annotations

import pytest
import torch
from test_quant_backends import X

import peftlab
from peftlab.backends.quant.model import quantize

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
pytestmark = [
    pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
SPECS = {
    "nf4": {"bits": 4},
    "fp4": {"bits": 4, "quant_type": "fp4", "double_quant": False},
    "int8": {"bits": 8},
    "torchao-int8": {"backend": "torchao", "scheme": "int8"},
    "torchao-int4": {"backend": "torchao", "scheme": "int4", "group_size": 32},
    "mxfp4": {"backend": "mxfp4"},  # peft has no MXFP4 layer: our Mxfp4Linear is an nn.Linear it wraps as one
}


def base(tiny, kind):
    if kind.startswith("torchao"):
        pytest.importorskip("torchao")
    return quantize(tiny("llama"), **SPECS[kind])


@pytest.mark.parametrize("kind", list(SPECS))
def test_peft_loads_an_export_from_a_quantized_base_with_our_logits(tiny, tmp_path, kind):
    ours = base(tiny, kind)
    peftlab.wrap(ours, peftlab.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(7))
        want = ours.eval()(X).logits
    peftlab.export_peft(ours, tmp_path)
    hf = peft.PeftModel.from_pretrained(base(tiny, kind), tmp_path).eval()
    with torch.no_grad():
        got = hf(X).logits
        with hf.disable_adapter():
            plain = hf(X).logits
    assert (want - plain).abs().max() > 0.05  # the adapter changes the output ...
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # ... and peft applies it as we do


def test_peft_cannot_target_our_own_fp8_block_layer(tiny):
    model = quantize(tiny("llama"), backend="fp8")
    with pytest.raises(ValueError, match="Fp8BlockLinear.*is not supported"):
        peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
