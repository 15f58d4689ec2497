"""HF PEFT loads every LoRA export we write with our logits (issue 30: task_type, unambiguous target names).

* ``task_type`` comes from transformers' auto-model mappings: None where no PEFT task model fits (Whisper, CLIP,
  SigLIP, Swin, Wav2Vec2), so peft's plain ``PeftModel`` runs the forward with the caller's arguments.
* ``target_modules`` select exactly the adapted modules: bare names when they pick nothing else, else a full-path
  regex (a VLM's vision tower has ``0``/``2``/``q_proj`` too).
* Where peft would read a target as something else (its transformers-v5 MoE conversion of ``gate_proj``/
  ``up_proj``/``down_proj`` on DeepSeek-V3 / Qwen3-Next), the export refuses and says why.
"""

from __future__ import annotations

import json

import pytest
import torch
from arch_zoo import build, inputs, logits

import peftlab
from helpers import perturb
from peftlab.core.state import get_state
from peftlab.core.structure import task_type


def _ours(label: str, config) -> tuple[torch.nn.Module, torch.Tensor]:
    model = peftlab.wrap(build(label), config)
    perturb(model, 0.2)
    with torch.no_grad():
        return model, logits(model(**inputs(label))).float()


def _peft_logits(label: str, folder) -> torch.Tensor:
    import peft

    theirs = peft.PeftModel.from_pretrained(build(label), str(folder)).eval()
    with torch.no_grad():
        return logits(theirs(**inputs(label))).float()


@pytest.mark.parametrize(
    ("label", "task"),
    [("Llama", "CAUSAL_LM"), ("T5", "SEQ_2_SEQ_LM"), ("BERT", "SEQ_CLS"), ("Llava", "CAUSAL_LM"),
     ("Whisper", None), ("CLIP", None), ("SigLIP", None), ("Swin", None), ("ViT", None), ("Wav2Vec2", None)],
)  # fmt: skip
def test_task_type_from_the_auto_mappings(label, task):
    assert task_type(build(label)) == task


@pytest.mark.parametrize(
    ("label", "targets"),
    [
        ("Whisper", None),  # task_type None: peft's forward runs (was SEQ_2_SEQ_LM: input_ids passed, raised)
        ("CLIP", None),
        ("Swin", None),
        ("Qwen2-VL", "all-linear"),  # bare '0', '2', 'qkv' ... would also match the vision tower
        ("Llava", None),  # defaults: the language model's q/v only (the CLIP tower has q_proj/v_proj too)
        ("DeepSeek-V3", ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
    ],
)
def test_peft_loads_our_export_with_our_logits(label, targets, tmp_path):
    model, ours = _ours(label, peftlab.LoraConfig(r=4, alpha=8, target_modules=targets))
    peftlab.export_peft(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["task_type"] == task_type(build(label))
    theirs = _peft_logits(label, tmp_path)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    back = peftlab.import_peft(build(label), tmp_path)
    assert sorted(get_state(back).targets) == sorted(get_state(model).targets)


def test_vlm_exports_name_exact_paths(tmp_path):
    model, _ = _ours("Qwen2-VL", peftlab.LoraConfig(r=4, target_modules="all-linear"))
    peftlab.export_peft(model, tmp_path)
    target = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(target, str) and "visual" in target and "language_model" in target
    model, _ = _ours("Llama", peftlab.LoraConfig(r=4, target_modules="all-linear"))
    peftlab.export_peft(model, tmp_path / "llama")
    names = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())["target_modules"]
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # as peft users write


@pytest.mark.parametrize("label", ["DeepSeek-V3", "Qwen3-Next"])
def test_export_refuses_what_peft_would_read_as_experts(label, tmp_path):
    model = peftlab.wrap(build(label), peftlab.LoraConfig(r=4, target_modules=["down_proj"]))  # dense / shared MLP
    with pytest.raises(peftlab.ConfigError, match="MoE conversion reads every target named"):
        peftlab.export_peft(model, tmp_path)
    peftlab.save_adapter(model, tmp_path / "ours")  # our own format keeps it
