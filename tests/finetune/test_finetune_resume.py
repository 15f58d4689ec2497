"""finetune() resumes an interrupted run exactly, writes atomically, and never replaces files it did not write."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("datasets")

from safetensors.torch import load_file  # noqa: E402

import peftlab  # noqa: E402
from peftlab.finetune import MANIFEST, finetune  # noqa: E402


@pytest.fixture
def rows_file(tmp_path):
    words = ["good", "bad", "fine", "awful", "great", "poor"]
    rows = [{"text": f"{words[i % 6]} {words[(i * 7) % 6]} movie", "label": ["pos", "neg"][i % 2]} for i in range(96)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def adapter_weights(out):
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    return load_file(str(out / "adapter" / config["weights"]))


def run(tiny_bert_dir, data, out, **kw):
    settings = {"eval_split": 0.25, "max_steps": 12, "batch_size": 8, "lr": 5e-3, "save_every": 4, "progress": False}
    return finetune(tiny_bert_dir, data, "classify", "lora", out, **{**settings, **kw})


def test_interrupted_run_resumes_to_the_same_adapter(tmp_path, tiny_bert_dir, rows_file):
    straight = run(tiny_bert_dir, rows_file, tmp_path / "a")

    class Crash(Exception):
        pass

    def crash_at_10(step):
        if step == 10:
            raise Crash

    with pytest.raises(Crash):
        run(tiny_bert_dir, rows_file, tmp_path / "b", step_callback=crash_at_10)
    checkpoint = tmp_path / "b" / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 8 and not (tmp_path / "b" / "adapter").exists()
    # only the last checkpoint's files are kept (step 4's were removed when step 8 committed)
    files = sorted(p.name for p in checkpoint.iterdir())
    assert files == ["optimizer-0000008.safetensors", "rng-0000008.safetensors", "state.json", "trainable-0000008.safetensors"]
    resumed = run(tiny_bert_dir, rows_file, tmp_path / "b")
    assert resumed["resumed_from_step"] == 8
    a, b = adapter_weights(tmp_path / "a"), adapter_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert resumed["eval"] == straight["eval"]
    assert not checkpoint.exists()  # a finished run leaves no stale training state


def test_a_checkpoint_of_another_run_is_refused(tmp_path, tiny_bert_dir, rows_file):
    with pytest.raises(RuntimeError):
        run(tiny_bert_dir, rows_file, tmp_path / "o", step_callback=lambda s: (_ for _ in ()).throw(RuntimeError()) if s == 5 else None)
    with pytest.raises(peftlab.ConfigError, match=r"different run \(differs in: lr\)"):
        finetune(tiny_bert_dir, rows_file, "classify", "lora", tmp_path / "o", eval_split=0.25, max_steps=12,
                 batch_size=8, lr=1e-3, save_every=4, progress=False)  # fmt: skip


def test_foreign_files_are_never_replaced(tmp_path, tiny_bert_dir, rows_file):
    out = tmp_path / "o"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "mine.txt").write_text("user file")
    with pytest.raises(peftlab.ConfigError, match="was not written by peftlab train"):
        run(tiny_bert_dir, rows_file, out)
    assert (out / "adapter" / "mine.txt").read_text() == "user file" and not (out / MANIFEST).exists()


def test_outputs_and_rerun(tmp_path, tiny_bert_dir, rows_file):
    """Outputs: adapter, peft, metrics.json; a rerun into the same folder replaces them, and its adapter
    loads into a fresh model with the label set the data named."""
    out = tmp_path / "o"
    first = run(tiny_bert_dir, rows_file, out, save_every=0)
    second = run(tiny_bert_dir, rows_file, out, save_every=0, seed=1)
    assert json.loads((out / MANIFEST).read_text())["written"] == ["adapter", "peft", "metrics.json"]
    assert first["labels"] == ["neg", "pos"] and json.loads((out / "metrics.json").read_text())["seed"] == 1
    assert not [p for p in out.rglob("*.tmp")]
    import peftlab.data as D

    model, tok = peftlab.load_model(tiny_bert_dir, kind="seq-cls", num_labels=2)
    data = D.prepare("classify", tok, rows_file, eval_split=0.25, seed=1)
    batch = data.collator([data.eval[i] for i in range(len(data.eval))])
    batch.pop("labels")
    with torch.no_grad():
        untrained = model(**batch).logits
        peftlab.load_adapter(model, out / "adapter")
        trained = model(**batch).logits
    assert not torch.allclose(untrained, trained, atol=1e-4)  # the adapter and its head copy were trained
    assert data.evaluate(model) == second["eval"]


@pytest.mark.parametrize("method", ["dora", "adalora", "qlora", "houlsby", "prefix"])
def test_other_methods_train_and_report_the_export(tmp_path, tiny_bert_dir, rows_file, method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    m = finetune(tiny_bert_dir, rows_file, "classify", method, tmp_path / method, eval_split=0.25, max_steps=3,
                 batch_size=8, save_every=0, progress=False)  # fmt: skip
    assert (tmp_path / method / "adapter" / "adapter_config.json").is_file()
    has_peft = (tmp_path / method / "peft" / "adapter_config.json").is_file()
    assert has_peft == (method != "houlsby")
    assert any("HF PEFT has no houlsby" in n for n in m["notes"]) == (method == "houlsby")
