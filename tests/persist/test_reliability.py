"""Nothing lost, nothing silent: transactional saves, rollback on failed wraps, NaN guards, validated configs."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import stat
import threading

import pytest
import torch

import peftlab
from helpers import perturb, slots, tiny_model
from peftlab.core.inject import Injection

IDS = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def lora_model(r=16):
    return peftlab.wrap(tiny_model("llama"), peftlab.LoraConfig(r=r, target_modules="all-linear"))


def set_version(model, v: float) -> None:
    with torch.no_grad():
        for s in slots(model, "LoraSlot"):
            s.lora_B.fill_(v)


def loaded_version(path, r: int = 16) -> float:
    fresh = peftlab.load_adapter(tiny_model("llama"), path)
    assert {s.r for s in slots(fresh, "LoraSlot")} == {r}
    values = torch.cat([s.lora_B.flatten() for s in slots(fresh, "LoraSlot")]).unique()
    assert values.numel() == 1, f"mixed adapter: {values[:5]}"  # never a mix of two saves
    return float(values[0])


def _save_forever(path: str) -> None:
    model = lora_model()
    v = 1.0
    while True:
        set_version(model, v)
        peftlab.save_adapter(model, path)
        v = 3.0 - v  # alternate 1.0 / 2.0


def _instrument(die_at: tuple[str, int] | None, counts: dict) -> None:
    """Count the save's file writes and renames; at ``die_at`` SIGKILL this process: ("write", k) after the k-th
    file write has written half its bytes, ("rename", k) between the k-th write and its rename, ("renamed", k)
    right after the k-th rename (this runs in a forked child, or with die_at=None in the parent to count)."""
    from peftlab.util import files

    def die(point: str) -> None:
        counts[point] = counts.get(point, 0) + 1
        if die_at == (point, counts[point]):
            os.kill(os.getpid(), signal.SIGKILL)

    def writer(real):
        def write(path, *args, **kwargs):
            real(path, *args, **kwargs)
            if die_at is not None and die_at == ("write", counts.get("write", 0) + 1):
                os.truncate(path, os.path.getsize(path) // 2)  # a torn file, as a kill mid-write leaves it
            die("write")

        return write

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        die("rename")
        real_replace(src, dst, *args, **kwargs)
        die("renamed")

    files._write_json_file = writer(files._write_json_file)
    files._write_safetensors_file = writer(files._write_safetensors_file)
    files.os.replace = replace


def _save_and_die(path: str, die_at: tuple[str, int]) -> None:
    model = lora_model()
    set_version(model, 2.0)
    _instrument(die_at, {})
    peftlab.save_adapter(model, path)


def test_kill_9_mid_save_leaves_old_or_new_adapter(tmp_path, monkeypatch):
    """Deterministic fault injection: a save of version 2 over version 1 is killed (SIGKILL) at every point of
    its file protocol in turn (mid-write, between a write and its rename, after each rename); each time the
    folder loads as version 1 or 2, never a mix or a torn file, and once the last rename happened, as 2."""
    path = tmp_path / "ad"
    model = lora_model()
    set_version(model, 1.0)
    peftlab.save_adapter(model, path)
    counts: dict = {}
    with monkeypatch.context() as m:  # count the points of one save
        from peftlab.util import files

        for name in ("_write_json_file", "_write_safetensors_file"):
            m.setattr(files, name, getattr(files, name))
        m.setattr(files.os, "replace", os.replace)
        _instrument(None, counts)
        peftlab.save_adapter(model, tmp_path / "count")
    assert counts.get("write", 0) >= 2 and counts.get("rename", 0) >= 2, counts
    points = [(kind, k) for kind in ("write", "rename", "renamed") for k in range(1, counts[kind] + 1)]
    ctx = mp.get_context("fork")
    for point in points:
        proc = ctx.Process(target=_save_and_die, args=(str(path), point))
        proc.start()
        proc.join()
        assert proc.exitcode == -signal.SIGKILL, (point, proc.exitcode)  # it died at that point
        version = loaded_version(path)
        assert version in (1.0, 2.0), point
        if point == ("renamed", counts["renamed"]):
            assert version == 2.0
        set_version(model, 1.0)
        peftlab.save_adapter(model, path)  # back to version 1; the next save cleans up what the kill left
    files_left = sorted(p.name for p in path.iterdir())
    assert len(files_left) == 3 and {"adapter_config.json", ".peftlab.lock"} <= set(files_left), files_left


def test_concurrent_saves_into_one_folder_never_mix(tmp_path, monkeypatch):
    """Deterministic interleaving: save A (r=16, version 1) pauses right after its first rename (one file of
    its save in place, the rest not) until save B (r=8, version 2) into the same folder has finished, or 0.5 s.
    With the folder lock, B waits for A; without it, B's files land between A's and the folder mixes r=16 and
    r=8 files (which does not load). Then both orders of 15 unsynchronised saves each."""
    from peftlab.util import files

    path = tmp_path / "ad"
    a, b = lora_model(16), lora_model(8)
    set_version(a, 1.0)
    set_version(b, 2.0)
    paused, b_done = threading.Event(), threading.Event()
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if threading.current_thread().name == "A" and not paused.is_set():
            paused.set()
            b_done.wait(0.5)

    monkeypatch.setattr(files.os, "replace", replace)
    errors = []

    def save(model, wait=None, done=None):
        try:
            if wait is not None:
                assert wait.wait(10)
            peftlab.save_adapter(model, path)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        if done is not None:
            done.set()

    threads = [threading.Thread(target=save, args=(a,), name="A"), threading.Thread(target=save, args=(b, paused, b_done))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and paused.is_set()
    assert loaded_version(path, r=8) == 2.0  # B ran after A, whole
    monkeypatch.undo()
    first = lora_model()
    set_version(first, 1.0)
    set_version(a, 2.0)
    peftlab.save_adapter(first, path)

    def writer(m):
        try:
            for _ in range(15):
                peftlab.save_adapter(m, path)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(m,)) for m in (first, a)]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        seen.add(loaded_version(path))
    for t in threads:
        t.join()
    assert not errors and seen <= {1.0, 2.0}
    assert loaded_version(path) in (1.0, 2.0)


def test_saved_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        peftlab.save_adapter(lora_model(), tmp_path / "ad")
        peftlab.export_peft(lora_model(), tmp_path / "hf")
    finally:
        os.umask(old)
    for f in list((tmp_path / "ad").iterdir()) + list((tmp_path / "hf").iterdir()):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_nan_adapter_is_refused_on_load_import_and_merge(tmp_path):
    model = lora_model()
    perturb(model)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        layer.slots["default"].lora_B[0, 0] = float("nan")
    with pytest.raises(peftlab.AdapterFileError, match=r"refusing to save adapter 'default': tensor .*q_proj\.lora_B"):
        peftlab.save_adapter(model, tmp_path / "ours")
    with pytest.raises(peftlab.AdapterFileError, match=r"refusing to export adapter 'default': tensor .*q_proj"):
        peftlab.export_peft(model, tmp_path / "hf")
    assert not list((tmp_path / "ours").glob("adapter*")) and not list((tmp_path / "hf").glob("adapter*"))
    peftlab.save_adapter(model, tmp_path / "ours", check_finite=False)
    peftlab.export_peft(model, tmp_path / "hf", check_finite=False)
    with pytest.raises(peftlab.AdapterFileError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_B has 1 NaN/inf"):
        peftlab.load_adapter(tiny_model("llama"), tmp_path / "ours")
    with pytest.raises(peftlab.AdapterFileError, match="NaN/inf"):
        peftlab.import_peft(tiny_model("llama"), tmp_path / "hf")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(peftlab.MergeError, match="NaN/inf"):
        peftlab.merge(model)  # safe by default
    assert all(torch.equal(p, before[n]) or p.isnan().any() for n, p in model.named_parameters())
    assert not peftlab.is_merged(model)


@pytest.mark.parametrize(
    "make",
    [
        lambda: peftlab.LoraConfig(r=4, target_modules="all-linear", adapter_name="new"),
        lambda: peftlab.AdaLoraConfig(init_r=4, total_steps=5, target_r=2, target_modules="all-linear", adapter_name="new"),
        lambda: peftlab.AdapterConfig(style="houlsby", reduction_factor=4, adapter_name="new"),
        lambda: peftlab.AdapterConfig(style="parallel", reduction_factor=4, adapter_name="new"),
        lambda: peftlab.PrefixConfig(num_virtual_tokens=2, adapter_name="new"),
    ],
)
@pytest.mark.parametrize("where", ["first", "last", "registry"])
def test_failed_wrap_is_rolled_back_for_every_method(make, where, monkeypatch):
    """A failure at the first injection step, at the last one (everything added), or after the method (the
    registry step): the model is left exactly as it was. The steps are counted on a clean wrap first, so every
    case really fails (no case returns without its assertions)."""
    counted = {"n": 0}
    real_add, real_hook = Injection.add_slot, Injection.hook
    with monkeypatch.context() as m:
        m.setattr(Injection, "add_slot", lambda self, *a, **kw: counted.update(n=counted["n"] + 1) or real_add(self, *a, **kw))
        m.setattr(Injection, "hook", lambda self, h: real_hook(self, h) or counted.update(n=counted["n"] + 1))
        peftlab.wrap(tiny_model("llama"), make())
    assert counted["n"] >= 1
    fail_at = {"first": 1, "last": counted["n"], "registry": 1000}[where]
    model = peftlab.wrap(tiny_model("llama"), peftlab.LoraConfig(r=2, target_modules=["q_proj"], adapter_name="old"))
    keys = list(model.state_dict())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    types = {n: type(m) for n, m in model.named_modules()}
    attn = model.config._attn_implementation
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    calls = {"n": 0}

    def boom():
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("injected failure")

    def add_slot(self, *a, **kw):
        boom()
        return real_add(self, *a, **kw)

    def hook(self, handle):
        real_hook(self, handle)
        boom()

    monkeypatch.setattr(Injection, "add_slot", add_slot)
    monkeypatch.setattr(Injection, "hook", hook)
    config = make()
    if fail_at == 1000:  # fail after the method finished: in the registry step
        monkeypatch.setattr("peftlab.api.set_active_adapters", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("late")))
    with pytest.raises(RuntimeError, match="injected failure|late"):
        peftlab.wrap(model, config)
    assert list(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert model.config._attn_implementation == attn and peftlab.list_adapters(model) == ["old"]
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, want, rtol=0, atol=0)
    peftlab.wrap(model, make())  # and the same wrap then works


def test_merged_prefix_and_bottleneck_never_saved_as_a_plain_checkpoint(tmp_path):
    for config in (peftlab.PrefixConfig(num_virtual_tokens=2), peftlab.AdapterConfig(style="pfeiffer")):
        model = peftlab.wrap(tiny_model("llama"), config)
        if config.method == "prefix":
            peftlab.merge(model)
        with pytest.raises(peftlab.MergeError, match="cannot be folded into the base weights"):
            peftlab.save_merged(model, tmp_path / config.method)
        assert not (tmp_path / config.method).exists()


def test_training_a_merged_adapter_says_unmerge():
    model = lora_model()
    peftlab.merge(model)
    model.train()
    with pytest.warns(UserWarning, match="is merged into the base weights.*unmerge"):
        loss = model(input_ids=IDS, labels=IDS).loss
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: peftlab.LoraConfig(alpha=float("inf")), "alpha must be a finite number"),
        (lambda: peftlab.LoraConfig(alpha=float("nan")), "alpha must be a finite number"),
        (lambda: peftlab.LoraConfig(r=True), "rank r must be an integer"),
        (lambda: peftlab.AdapterConfig(scale=float("nan")), "scale must be a finite number"),
        (lambda: peftlab.AdapterConfig(dropout="0.1"), r"dropout must be a finite number in \[0, 1\), got '0.1'"),
        (lambda: peftlab.PrefixConfig(num_virtual_tokens=True), "num_virtual_tokens must be a positive integer"),
        (lambda: peftlab.AdaLoraConfig(alpha="x", total_steps=10), "alpha must be a finite number"),
        (lambda: peftlab.LoraConfig(target_modules=[1, 2]), "entries must be non-empty module names"),
        (lambda: peftlab.PrefixConfig(adapter_name="a.b"), "invalid adapter name 'a.b'"),
    ],
)
def test_every_numeric_and_name_field_is_validated(make, message):
    with pytest.raises(peftlab.ConfigError, match=message):
        make()


def test_targeting_and_site_errors_name_what_is_valid(tmp_path):
    model = tiny_model("bert")
    peftlab.wrap(model, peftlab.LoraConfig(target_modules="query"))  # a bare name, not a full-match regex
    assert len(slots(model)) == 2
    with pytest.raises(peftlab.ConfigError, match="rank_pattern key 'nope' matches no targeted module"):
        peftlab.wrap(tiny_model("bert"), peftlab.LoraConfig(target_modules=["query"], rank_pattern={"nope": 2}))
    with pytest.raises(peftlab.TargetError, match=r"adapter layers \[99\] do not exist.*blocks are 0..1"):
        peftlab.wrap(tiny_model("bert"), peftlab.AdapterConfig(layers=[99]))
    with pytest.raises(peftlab.ConfigError, match="first group that captures the layer index"):
        peftlab.wrap(tiny_model("bert"), peftlab.AdapterConfig(style="pfeiffer", ffn_out=r".*output\.dense"))
    with pytest.raises(peftlab.ConfigError, match="reduction_factor 10000 leaves no bottleneck unit"):
        peftlab.wrap(tiny_model("bert"), peftlab.AdapterConfig(reduction_factor=10000))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "target_modules": ["query"]}')
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(peftlab.AdapterFileError, match=r"\.bin \(pickle\).*safetensors"):
        peftlab.import_peft(tiny_model("bert"), tmp_path / "bin")
    with pytest.raises(peftlab.TargetError, match="needs a transformers model with a .config"):
        peftlab.wrap(torch.nn.Sequential(torch.nn.Linear(2, 2)), peftlab.PrefixConfig())


def test_adalora_step_without_gradients_warns_once(recwarn):
    model = peftlab.wrap(tiny_model("llama"), peftlab.AdaLoraConfig(init_r=4, target_r=2, total_steps=10))
    peftlab.on_train_step(model, 0)
    peftlab.on_train_step(model, 1)
    assert sum("found no gradients" in str(w.message) for w in recwarn) == 1
