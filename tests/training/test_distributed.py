"""More than one process (CPU, gloo, 2 processes under torchrun) and the training loop's precision and
accumulation options.

One ``torchrun --nproc_per_node 2`` launch of ``tests/dist_scripts/equivalence.py`` trains MiniLM-L6 + LoRA
under DDP (accelerate), then under FSDP2 (``fully_shard`` per BertLayer + root), then runs the Trainer
scenarios of tests/training/test_trainer.py, all in the same two processes (one start-up, ~1 min on 2 cores). The
one-process references (batch 8; grad_accum 2 × batch 4) run in this process. Every scenario sees the same
global batches of 8 SST-2 rows in the same order, dropout off, gradient clipping active on every step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from helpers import DATA_DIR, REPO, accuracy, sst2_batches

SCRIPTS = REPO / "tests" / "dist_scripts"
RTOL = 1e-5


def _env() -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONSAFEPATH": "1",  # keep the repo's top-level kernels/ folder off sys.path
        "OMP_NUM_THREADS": "1",
        "PEFTLAB_DATA": str(DATA_DIR),
        "PYTHONPATH": os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]),
    }


@pytest.fixture(scope="session")
def two_process(tmp_path_factory) -> Path:
    """Outputs of the 2-process scenarios (ddp, fsdp, trainer, trainer-resume)."""
    out = tmp_path_factory.mktemp("two_process")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(SCRIPTS / "equivalence.py"), str(out), "ddp", "fsdp", "trainer", "trainer-resume",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=out)
    print(f"2-process launch (ddp, fsdp, trainer, trainer-resume): {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.fixture(scope="session")
def one_process(tmp_path_factory) -> Path:
    """Outputs of the 1-process references (single: batch 8; accum: grad_accum 2 x batch 4), run here."""
    out = tmp_path_factory.mktemp("one_process")
    sys.path.insert(0, str(SCRIPTS))
    try:
        import equivalence

        os.environ.setdefault("PEFTLAB_DATA", str(DATA_DIR))
        equivalence.run_scenario("single", out)
        equivalence.run_scenario("accum", out)
    finally:
        sys.path.remove(str(SCRIPTS))
    return out


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved peftlab adapter (the weights file its config names)."""
    from peftlab.training.callbacks import adapter_weights_name

    return load_file(folder / adapter_weights_name(folder))


def _losses(folder: Path) -> list[float]:
    return json.loads((folder / "losses.json").read_text())["losses"]


def _assert_same_run(run: Path, reference: Path) -> None:
    got, want = _losses(run), _losses(reference)
    assert len(got) == len(want) == 6
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=RTOL, atol=0)
    norms = json.loads((run / "losses.json").read_text())["grad_norms"]
    assert min(norms) > 0.05  # clipping (max_grad_norm 0.05) was active on every step
    a, b = (
        adapter_tensors(run / "adapter"),
        adapter_tensors(reference / "adapter"),
    )
    assert (
        a.keys() == b.keys() and len(a) == 6 * 2 * 2 + 2
    )  # lora A, B on query, value of 6 layers + classifier
    for key in a:
        assert a[key].shape == b[key].shape and a[key].numel() > 0, key
        # relative to the tensor: max |a - b| <= 1e-5 max |b| (entries near 0 make elementwise ratios meaningless)
        error = ((a[key] - b[key]).abs().max() / b[key].abs().max()).item()
        assert error <= RTOL, (key, error)


def test_ddp_two_processes_match_one_process_batch_8(two_process, one_process):
    _assert_same_run(two_process / "ddp", one_process / "single")


def test_fsdp2_two_processes_match_one_process_batch_8(two_process, one_process):
    _assert_same_run(two_process / "fsdp", one_process / "single")


def test_grad_accum_2x4_matches_batch_8(one_process):
    _assert_same_run(one_process / "accum", one_process / "single")


def test_fsdp_saves_unsharded_shapes(two_process, one_process):
    """Every tensor saved from the sharded model has the unsharded shape (never torch.Size([0]))."""
    sharded, unsharded = (
        adapter_tensors(two_process / "fsdp" / "adapter"),
        adapter_tensors(one_process / "single" / "adapter"),
    )
    assert sharded.keys() == unsharded.keys()
    for key, value in sharded.items():
        assert value.shape == unsharded[key].shape and value.numel() > 0, key
    shapes = json.loads((two_process / "fsdp" / "shapes.json").read_text())  # the model before sharding
    merged_fsdp = load_file(two_process / "fsdp" / "merged" / "model.safetensors")
    merged_ddp = load_file(two_process / "ddp" / "merged" / "model.safetensors")
    assert merged_fsdp.keys() == merged_ddp.keys()
    for key in merged_fsdp:
        assert merged_fsdp[key].numel() > 0 and list(merged_fsdp[key].shape) == list(merged_ddp[key].shape), (
            key
        )
        if key in shapes:
            assert list(merged_fsdp[key].shape) == shapes[key], key
        torch.testing.assert_close(merged_fsdp[key], merged_ddp[key], rtol=RTOL, atol=1e-6, msg=key)


def test_merge_and_unwrap_work_on_the_sharded_model(two_process):
    report = json.loads((two_process / "fsdp" / "merge_unwrap.json").read_text())
    assert report["merge"]["max_abs_diff"] < 1e-5, report  # merged logits == adapted logits
    assert report["unwrap"]["max_abs_diff"] < 1e-5, report  # unwrapped logits == base logits


def test_saved_adapters_load_in_peftlab_and_peft(two_process, one_process, minilm_dir):
    """DDP, FSDP and one-process adapters give the same logits, through peftlab and through HF PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    batch = {k: v for k, v in sst2_batches(minilm_dir, "dev", 8, 8)[0].items() if k != "labels"}

    def base():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()

    with torch.no_grad():
        reference = peftlab.load_adapter(base(), one_process / "single" / "adapter")(**batch).logits
        for run in (two_process / "ddp", two_process / "fsdp", one_process / "accum"):
            ours = peftlab.load_adapter(base(), run / "adapter")(**batch).logits
            theirs = PeftModel.from_pretrained(base(), run / "peft").eval()(**batch).logits
            torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_trainer_ddp_checkpoints_are_adapters_and_resume_exactly(two_process):
    """transformers.Trainer + PeftlabCallback under the 2-process launch (DDP): adapter-only checkpoints, and the
    run resumed from checkpoint-3 repeats steps 4-6 of the uninterrupted one."""
    full = json.loads((two_process / "trainer" / "trainer.json").read_text())
    resumed = json.loads((two_process / "trainer-resume" / "trainer.json").read_text())
    assert full["world"] == resumed["world"] == 2
    for step in ("4", "5", "6"):
        assert resumed["losses"][step] == pytest.approx(full["losses"][step], rel=RTOL), step
    assert resumed["ranks"] == full["ranks"]
    checkpoint = two_process / "trainer" / "run" / "checkpoint-3"
    assert not (checkpoint / "model.safetensors").exists() and (checkpoint / "adapter_config.json").is_file()
    a, b = (
        adapter_tensors(two_process / "trainer" / "final"),
        adapter_tensors(two_process / "trainer-resume" / "final"),
    )
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=1e-8, msg=key)


# ---- bad input ----------------------------------------------------------------------------------


def test_fp16_on_cpu_is_a_clear_error():
    from peftlab.training.loop import check_precision

    with pytest.raises(peftlab.ConfigError, match="bf16"):
        check_precision("fp16", "cpu")
    with pytest.raises(peftlab.ConfigError, match="fp32, bf16, fp16"):
        check_precision("fp8", "cpu")


def test_fsdp_refuses_adalora_and_says_why(tiny):
    from peftlab.training.fsdp import check_shardable

    model = tiny("bert")
    peftlab.wrap(model, peftlab.AdaLoraConfig(init_r=4, target_r=2, target_modules=["query"], total_steps=10))
    with pytest.raises(peftlab.ConfigError, match="adalora.*DDP"):
        check_shardable(model)
    lora = tiny("bert")
    peftlab.wrap(lora, peftlab.LoraConfig(r=2, target_modules=["query"]))
    check_shardable(lora)  # LoRA shards


def test_split_batches_needs_divisible_batches():
    from peftlab.training.loop import split_batches

    batch = {"input_ids": torch.arange(12).view(6, 2)}
    parts = list(split_batches(iter([batch]), processes=2, rank=1, grad_accum=1))
    assert torch.equal(parts[0]["input_ids"], batch["input_ids"][3:])
    with pytest.raises(peftlab.ConfigError, match="divisible by 4"):
        list(split_batches(iter([batch]), processes=2, rank=0, grad_accum=2))


def test_more_processes_than_cores_is_a_clear_error():
    from peftlab.bench.multiprocess import check_processes

    with pytest.raises(peftlab.ConfigError, match="cores"):
        check_processes(os.cpu_count() + 1, "cpu")
    check_processes(1, "cpu")


# ---- mixed precision ----------------------------------------------------------------------------


@pytest.mark.slow
def test_bf16_autocast_trains_minilm_lora_within_one_point_of_fp32(minilm_dir, sst2_dir):
    """100 steps of LoRA on SST-2 under CPU bf16 autocast end within 1 accuracy point of fp32 (872 sentences,
    evaluated in fp32). bf16 runs first, so a failure costs seconds."""
    train_batches = sst2_batches(minilm_dir, "train", 16, 1600, max_length=40, seed=0)
    dev = sst2_batches(minilm_dir, "test", 128, 872, max_length=64)
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # CPU bf16 GEMMs are slow: every core, even beside another worker
    try:
        _train_both(results, train_batches, dev)
    finally:
        torch.set_num_threads(threads)
    (fp32, fp32_losses), (bf16, bf16_losses) = results["fp32"], results["bf16"]
    print(f"SST-2 accuracy after 100 steps: fp32 {fp32:.4f}, bf16 autocast {bf16:.4f}")
    assert fp32 > 0.75  # it learned
    assert abs(bf16 - fp32) <= 0.01
    assert fp32_losses != bf16_losses  # autocast was on


def _train_both(results, train_batches, dev):
    from peftlab.training.loop import train

    for precision in ("bf16", "fp32"):
        torch.manual_seed(0)
        model, _ = peftlab.load_model("minilm-l6", kind="seq-cls", num_labels=2)
        config = peftlab.LoraConfig(
            r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]
        )
        peftlab.wrap(model, config)
        result = train(
            model, iter(train_batches), 100, lr=2e-3, device="cpu", progress=False, precision=precision
        )
        results[precision] = (accuracy(model, dev), result.losses)
