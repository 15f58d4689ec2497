"""transformers.Trainer with peftlab.PeftlabCallback, one process: adapter-only checkpoints and exact resume.

The scenarios (tests/dist_scripts/trainer_scenarios.py) train MiniLM-L6 + AdaLoRA for 6 steps with
checkpoints at steps 3 and 6; the 2-process (DDP) versions run in tests/training/test_distributed.py.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from helpers import DATA_DIR, REPO, sst2_batches

SCRIPTS = REPO / "tests" / "dist_scripts"


@pytest.fixture(scope="module")
def scenarios():
    sys.path.insert(0, str(SCRIPTS))
    os.environ.setdefault("PEFTLAB_DATA", str(DATA_DIR))
    try:
        import trainer_scenarios

        yield trainer_scenarios
    finally:
        sys.path.remove(str(SCRIPTS))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def runs(scenarios, tmp_path_factory) -> tuple[Path, list[str]]:
    """The uninterrupted run, then the run resumed from its checkpoint-3; with the Trainer's warnings."""
    import transformers

    out = tmp_path_factory.mktemp("trainer")
    records = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    try:
        scenarios.run("trainer", out)
        scenarios.run("trainer-resume", out)
    finally:
        logger.removeHandler(records)
        transformers.logging.set_verbosity(level)
    return out, records.messages


def _record(folder: Path) -> dict:
    return json.loads((folder / "trainer.json").read_text())


def test_checkpoints_and_save_model_hold_only_the_adapter(runs, minilm_dir, scenarios):
    out, _ = runs
    run = out / "trainer"
    for folder in (run / "run" / "checkpoint-3", run / "run" / "checkpoint-6", run / "final"):
        names = {p.name for p in folder.iterdir()}
        assert "model.safetensors" not in names and "config.json" not in names, names
        assert "adapter_config.json" in names and (folder / "peft" / "adapter_model.safetensors").is_file()
        size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
        assert size < 2_000_000, size  # the adapter (+ a resume copy), not the 90 MB model
    # the saved adapter reproduces the trained model's outputs on a fresh base
    batch = {k: v for k, v in sst2_batches(minilm_dir, "dev", 8, 8)[0].items() if k != "labels"}
    model, _ = scenarios.make_model("adalora")  # same init; the adapter values come from the file
    peftlab.unwrap(model)
    peftlab.load_adapter(model, run / "final")
    resumed, _ = scenarios.make_model("adalora")
    peftlab.unwrap(resumed)
    peftlab.load_adapter(resumed, run / "run" / "checkpoint-6")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, resumed.eval()(**batch).logits)
    # a plain from_pretrained of the folder fails loudly instead of silently dropping the adapter
    from transformers import AutoModelForSequenceClassification

    with pytest.raises((OSError, ValueError, KeyError)):  # KeyError: transformers reads adapter_config.json
        AutoModelForSequenceClassification.from_pretrained(run / "final")


def test_resume_gives_the_uninterrupted_run(runs):
    """Steps 4-6 after resuming from checkpoint-3 equal the uninterrupted run's (adapter, optimizer, scheduler
    and AdaLoRA allocator state restored), and so do the final adapter and AdaLoRA's ranks."""
    out, messages = runs
    full, resumed = _record(out / "trainer"), _record(out / "trainer-resume")
    for step in ("4", "5", "6"):
        assert resumed["losses"][step] == pytest.approx(full["losses"][step], rel=1e-6), step
    assert resumed["ranks"] == full["ranks"]
    a = _tensors(out / "trainer" / "final")
    b = _tensors(out / "trainer-resume" / "final")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-8, msg=key)
    # the adapter-only load is not reported as "missing keys" (every base weight) by the Trainer
    assert not [m for m in messages if "keys in the checkpoint model loaded" in m], messages[:2]


def test_checkpoint_restores_the_allocator_state(runs, scenarios):
    """The Trainer's resume loader (index -> load_state_dict) puts AdaLoRA's importance EMAs back."""
    from transformers.trainer_utils import load_sharded_checkpoint

    from peftlab.core.state import get_state
    from peftlab.methods.adalora.train_state import _allocator
    from peftlab.training.callbacks import TRAIN_STATE_NAME, TRAIN_STATE_PREFIX, install_adapter_checkpoints

    out, _ = runs
    checkpoint = out / "trainer" / "run" / "checkpoint-3"
    saved = {
        k: v for k, v in load_file(checkpoint / TRAIN_STATE_NAME).items() if k.startswith(TRAIN_STATE_PREFIX)
    }
    ipt = {k.split(".ipt.", 1)[1]: v for k, v in saved.items() if ".ipt." in k}
    assert ipt and all(v.abs().sum() > 0 for v in ipt.values())  # 3 steps of importance EMAs
    model, _ = scenarios.make_model("adalora")
    install_adapter_checkpoints(model)
    allocator = _allocator(get_state(model))
    assert not allocator.ipt
    load_sharded_checkpoint(model, checkpoint, strict=False)
    assert allocator.ipt.keys() == ipt.keys()
    for key in ipt:
        torch.testing.assert_close(allocator.ipt[key], ipt[key])
    adapter = _tensors(out / "trainer" / "run" / "checkpoint-3")
    assert len(adapter) > 0


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from peftlab.training.callbacks import adapter_weights_name

    return load_file(folder / adapter_weights_name(folder))
