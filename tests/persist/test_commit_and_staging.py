"""Issue 29 (files): a save commits with one rename (kills at chosen points leave the old or the new adapter),
a multi-adapter save commits through one manifest, a newer save wins over an older layout, loads and imports
attach all adapters or none, and HF PEFT options we do not implement are refused by name."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest
import torch

import peftlab
from helpers import slots, tiny_model
from peftlab.util import files

IDS = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def lora(v: float = 1.0, names=("default",)):
    model = tiny_model("llama")
    for name in names:
        peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], adapter_name=name))
    set_version(model, v)
    return model


def set_version(model, v: float, adapter_name=None) -> None:
    with torch.no_grad():
        for s in slots(model, "LoraSlot", adapter_name):
            s.lora_B.fill_(v)


def version(model, adapter_name=None) -> float:
    values = torch.cat([s.lora_B.flatten() for s in slots(model, "LoraSlot", adapter_name)]).unique()
    assert values.numel() == 1, f"mixed adapter: {values[:5]}"
    return float(values[0])


def versions(path) -> dict[str, float]:
    model = peftlab.load_adapter(tiny_model("llama"), path)
    return {name: version(model, name) for name in peftlab.list_adapters(model)}


def _killed_save(model, path, kill_at: int, after: bool) -> None:
    """In a forked child: save, and die (no cleanup, no rollback: os._exit) at the kill_at-th rename."""
    real = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == kill_at and not after:
            os._exit(9)
        real(src, dst)
        if calls["n"] == kill_at and after:
            os._exit(9)

    files.os.replace = replace
    peftlab.save_adapter(model, path)
    os._exit(0)


def kill_during_save(model, path, kill_at: int, after: bool) -> int:
    proc = mp.get_context("fork").Process(target=_killed_save, args=(model, path, kill_at, after))
    proc.start()
    proc.join()
    return proc.exitcode


@pytest.mark.parametrize("names", [("default",), ("a", "b")], ids=["one", "two"])
def test_a_kill_at_every_rename_leaves_the_old_or_the_new_adapter(tmp_path, names):
    path = tmp_path / "ad"
    path.mkdir()
    (path / "notes.tmp").write_text("mine")
    model = lora(1.0, names)
    peftlab.save_adapter(model, path)
    old = versions(path)
    set_version(model, 2.0)
    new = dict.fromkeys(old, 2.0)
    outcomes = set()
    for kill_at in range(1, 2 * len(names) + 3):
        for after in (False, True):
            code = kill_during_save(model, path, kill_at, after)
            got = versions(path)  # always one complete state
            assert got in (old, new), (kill_at, after, got)
            outcomes.add((code, got == new))
            set_version(model, 1.0)
            peftlab.save_adapter(model, path)  # back to old; cleans what the kill left
            set_version(model, 2.0)
    assert (
        (9, False) in outcomes and (9, True) in outcomes and (0, True) in outcomes
    )  # every point was reached
    assert (path / "notes.tmp").read_text() == "mine"
    leftovers = [p.name for p in path.rglob("*") if "staging" in p.name or p.name.endswith(".tmp")]
    assert leftovers == ["notes.tmp"], leftovers
    weights = sorted(p.relative_to(path) for p in path.rglob("adapter-*.safetensors"))
    assert len(weights) == len(names), weights  # no orphaned weights


def test_multi_save_failing_at_the_second_folder_keeps_the_previous_state(tmp_path, monkeypatch):
    path = tmp_path / "two"
    model = lora(1.0, ("a", "b"))
    peftlab.save_adapter(model, path)
    before = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    set_version(model, 2.0)
    real = files.FolderWriter.write_safetensors
    calls = {"n": 0}

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(files.FolderWriter, "write_safetensors", failing)
    with pytest.raises(OSError, match="No space"):
        peftlab.save_adapter(model, path)
    monkeypatch.undo()
    assert versions(path) == {"a": 1.0, "b": 1.0}
    assert (
        sorted(str(p.relative_to(path)) for p in path.rglob("*")) == before
    )  # the new first file is gone too
    peftlab.save_adapter(model, path)
    assert versions(path) == {"a": 2.0, "b": 2.0}
    manifest = json.loads((path / "adapters.json").read_text())  # names every sub-folder and its file
    for name in ("a", "b"):
        record = manifest["records"][name]
        assert record["folder"] == name and (path / name / record["weights"]).is_file()
        assert (
            version(peftlab.load_adapter(tiny_model("llama"), path / name)) == 2.0
        )  # a sub-folder loads alone
        assert version(peftlab.load_adapter(tiny_model("llama"), path, adapter_name=name)) == 2.0


def test_a_newer_save_wins_over_an_older_layout(tmp_path):
    path = tmp_path / "ad"
    peftlab.save_adapter(lora(1.0), path)
    peftlab.save_adapter(lora(2.0, ("a", "b")), path)
    assert versions(path) == {"a": 2.0, "b": 2.0}
    assert not (path / "adapter_config.json").exists()
    peftlab.save_adapter(lora(3.0, ("c",)), path)
    assert versions(path) == {"c": 3.0}
    assert sorted(p.name for p in path.iterdir()) == [
        ".peftlab.lock",
        "adapter-" + _hash(path),
        "adapter_config.json",
    ]
    # a crash between the commit and the clean-up leaves both layouts: the newer one loads
    peftlab.save_adapter(lora(4.0, ("a", "b")), path)
    (path / "adapter_config.json").write_text(
        json.dumps({**json.loads((path / "a" / "adapter_config.json").read_text()), "generation": 1})
    )
    assert versions(path) == {"a": 4.0, "b": 4.0}


def _hash(path) -> str:
    (weights,) = path.glob("adapter-*.safetensors")
    return weights.name.removeprefix("adapter-")


def test_export_leaves_no_stale_sub_folders(tmp_path):
    path = tmp_path / "hf"
    peftlab.export_peft(lora(1.0, ("default", "b", "c")), path)
    assert sorted(peftlab.list_adapters(peftlab.import_peft(tiny_model("llama"), path))) == [
        "b",
        "c",
        "default",
    ]
    (path / "b" / "mine.txt").write_text("mine")
    peftlab.export_peft(lora(2.0), path)
    model = peftlab.import_peft(tiny_model("llama"), path)
    assert peftlab.list_adapters(model) == ["default"] and version(model) == 2.0
    assert not (path / "c").exists() and sorted(p.name for p in (path / "b").iterdir()) == [
        ".peftlab.lock",
        "mine.txt",
    ]


def _two_adapter_model_state(model):
    with torch.no_grad():
        out = model(input_ids=IDS).logits
    return out, list(model.state_dict()), {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("fmt", ["ours", "hf"])
@pytest.mark.parametrize("base", ["plain", "wrapped"])
def test_a_load_that_fails_at_adapter_n_attaches_none(tmp_path, monkeypatch, fmt, base):
    saved = lora(1.0, ("a", "b", "c"))
    (peftlab.save_adapter if fmt == "ours" else peftlab.export_peft)(saved, tmp_path / "s")
    load = peftlab.load_adapter if fmt == "ours" else peftlab.import_peft
    model = tiny_model("llama")
    if base == "wrapped":
        peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["k_proj"], adapter_name="x"))
        set_version(model, 0.5)
        peftlab.wrap(model, peftlab.LoraConfig(r=2, target_modules=["o_proj"], adapter_name="y"))
        set_version(model, 0.3, "y")
        peftlab.set_active_adapters(model, ["x", "y"], [0.5, 2.0])
    want = _two_adapter_model_state(model)
    adapters_before = peftlab.list_adapters(model) if base == "wrapped" else []
    active_before = peftlab.active_adapters(model)

    # 1. a damaged file of the third adapter: found while staging, before anything is attached
    third = sorted((tmp_path / "s").glob("c/*.safetensors"))
    data = third[0].read_bytes()
    third[0].write_bytes(data[: len(data) // 2])
    with pytest.raises(peftlab.AdapterFileError, match="corrupt or truncated"):
        load(model, tmp_path / "s")
    third[0].write_bytes(data)
    # 2. a failure while attaching the second adapter: the first is removed again
    import peftlab.persist.format as fmt_mod

    real = fmt_mod.load_adapter_tensors
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure at adapter 2")
        return real(*a, **k)

    monkeypatch.setattr(fmt_mod, "load_adapter_tensors", failing)
    with pytest.raises(RuntimeError, match="adapter 2"):
        load(model, tmp_path / "s")
    monkeypatch.undo()
    got = _two_adapter_model_state(model)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert got[1:] == want[1:]
    if base == "plain":
        assert not hasattr(model, "peftlab_adapters")
    else:
        assert (
            peftlab.list_adapters(model) == adapters_before
            and peftlab.active_adapters(model) == active_before
        )
    load(model, tmp_path / "s")  # and then it loads, adding the three inactive beside what was there
    names = ["default", "b", "c"] if fmt == "hf" else ["a", "b", "c"]
    assert peftlab.list_adapters(model) == adapters_before + names
    if base == "wrapped":
        assert peftlab.active_adapters(model) == active_before  # with their weights kept:
        torch.testing.assert_close(_two_adapter_model_state(model)[0], want[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "option, value",
    [
        ("exclude_modules", ["k_proj"]),
        ("lora_bias", True),
        ("layer_replication", [[0, 2]]),
        ("alora_invocation_tokens", [5, 6]),
        ("use_qalora", True),
        ("layers_to_transform", [0]),
        ("ensure_weight_tying", True),
        ("a_future_peft_option", {"x": 1}),
    ],
)
def test_hf_options_we_do_not_implement_are_refused_by_name(tmp_path, option, value):
    peftlab.export_peft(lora(1.0), tmp_path / "hf")
    config = tmp_path / "hf" / "adapter_config.json"
    raw = json.loads(config.read_text())
    config.write_text(json.dumps({**raw, option: value}))
    model = tiny_model("llama")
    with pytest.raises(peftlab.ConfigError, match=rf"not supported by peftlab: {option}="):
        peftlab.import_peft(model, tmp_path / "hf")
    assert not hasattr(model, "peftlab_adapters")


def test_a_peft_config_with_every_default_imports(tmp_path):
    peft = pytest.importorskip("peft")
    peftlab.export_peft(lora(1.0), tmp_path / "hf")
    config = tmp_path / "hf" / "adapter_config.json"
    ours = json.loads(config.read_text())
    full = json.loads(json.dumps(peft.LoraConfig(r=2).to_dict(), default=list))  # every field of this peft
    full.update({k: ours[k] for k in ("r", "lora_alpha", "target_modules", "task_type", "peft_type")})
    config.write_text(json.dumps(full))
    model = peftlab.import_peft(tiny_model("llama"), tmp_path / "hf")
    assert version(model) == 1.0


def test_a_kill_before_the_sub_folder_configs_then_a_failed_save_keeps_the_manifest_loadable(tmp_path, monkeypatch):
    path = tmp_path / "two"
    model = lora(1.0, ("a", "b"))
    peftlab.save_adapter(model, path)
    set_version(model, 2.0)
    assert kill_during_save(model, path, kill_at=3, after=True) == 9  # renames: 2 weights, the manifest; configs not yet
    assert versions(path) == {"a": 2.0, "b": 2.0}
    set_version(model, 3.0)
    monkeypatch.setattr(files.FolderWriter, "write_json", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        peftlab.save_adapter(model, path)
    monkeypatch.undo()
    assert versions(path) == {"a": 2.0, "b": 2.0}  # the committed manifest's files were kept


def test_nan_in_any_adapter_refuses_the_whole_save(tmp_path):
    model = lora(1.0, ("a", "b"))
    with torch.no_grad():
        slots(model, "LoraSlot", "b")[0].lora_A[0, 0] = float("inf")
    with pytest.raises(peftlab.AdapterFileError, match=r"refusing to save adapter 'b': tensor .*lora_A has 1 NaN/inf"):
        peftlab.save_adapter(model, tmp_path / "two")
    assert not list((tmp_path / "two").rglob("*.safetensors")) and not (tmp_path / "two" / "adapters.json").exists()


def test_an_older_manifest_without_records_still_loads(tmp_path):
    peftlab.save_adapter(lora(3.0, ("a", "b")), tmp_path / "two")
    index = tmp_path / "two" / "adapters.json"
    raw = json.loads(index.read_text())
    index.write_text(json.dumps({k: raw[k] for k in ("peftlab_version", "adapters", "active")}))
    assert versions(tmp_path / "two") == {"a": 3.0, "b": 3.0}
    peftlab.save_adapter(lora(4.0, ("a", "b")), tmp_path / "two")  # and a save over it replaces it cleanly
    assert versions(tmp_path / "two") == {"a": 4.0, "b": 4.0}
    assert len(list((tmp_path / "two").rglob("adapter-*.safetensors"))) == 2
