"""Issue 29: a Trainer checkpoint of a merged model holds the adapter and reloads exactly (it used to fall
back to a full-model save whose wrapper keys a plain model cannot load: q/v re-initialised on reload)."""

from __future__ import annotations

import pytest
import torch

import peftlab
from helpers import perturb, tiny_model

IDS = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_checkpoint_of_a_merged_model_reloads_exactly(tmp_path, dora):
    from transformers import Trainer, TrainingArguments

    model = peftlab.wrap(
        tiny_model("llama"), peftlab.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=dora)
    )
    perturb(model, 0.2)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    peftlab.merge(model)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, callbacks=[peftlab.PeftlabCallback()])
    trainer.save_model(str(tmp_path / "final"))
    model.save_pretrained(str(tmp_path / "checkpoint"))  # what a checkpoint-N/ save calls
    assert peftlab.is_merged(model)  # the model is left as it was
    for folder in (tmp_path / "final", tmp_path / "checkpoint"):
        names = {p.name for p in folder.iterdir()}
        assert "adapter_config.json" in names and "model.safetensors" not in names, names
        assert {"peftlab_train_state.safetensors", "model.safetensors.index.json"} <= names  # what resuming reads
        assert not [n for n in names if "staging" in n or "tmp" in n], names
        fresh = peftlab.load_adapter(tiny_model("llama"), folder)
        with torch.no_grad():
            torch.testing.assert_close(fresh(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)
