"""Issue 29 (files): nothing read outside the adapter folder, the lock inside the folder it guards, no user
file removed by a save, and neither format writing over the other."""

from __future__ import annotations

import json
import os

import pytest
import torch

import peftlab
from helpers import slots, tiny_model
from peftlab.util.files import plain_name_in

IDS = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
CONFINED = r"must be one plain name inside the adapter folder"


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


def edit(path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x.safetensors", "a/b.safetensors", "a\\b", "/etc/passwd", "x\x00y", 3, None]
)
def test_plain_name_in_refuses_anything_but_a_plain_name(tmp_path, name):
    with pytest.raises(peftlab.AdapterFileError, match=CONFINED):
        plain_name_in(tmp_path, name)


def test_plain_name_in_refuses_links_that_leave_the_folder(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "real.safetensors").write_bytes(b"x")
    (tmp_path / "in" / "inside").symlink_to(tmp_path / "in" / "real.safetensors")
    (tmp_path / "in" / "outside").symlink_to(tmp_path / "secret.safetensors")  # target need not exist
    assert plain_name_in(tmp_path / "in", "inside") == tmp_path / "in" / "inside"
    assert plain_name_in(tmp_path / "in", "missing.safetensors") == tmp_path / "in" / "missing.safetensors"
    with pytest.raises(peftlab.AdapterFileError, match=CONFINED):
        plain_name_in(tmp_path / "in", "outside")


def test_crafted_weights_name_reads_nothing_outside_and_reveals_nothing(tmp_path):
    victim = lora(7.0)
    peftlab.save_adapter(victim, tmp_path / "other")
    (secret,) = (tmp_path / "other").glob("adapter-*.safetensors")
    peftlab.save_adapter(lora(1.0), tmp_path / "ad")
    config = tmp_path / "ad" / "adapter_config.json"
    messages = []
    for name in (
        f"../other/{secret.name}",  # exists
        "../other/adapter-0000000000000000.safetensors",  # does not
        str(secret),  # absolute, exists
        str(tmp_path / "other" / "nope.safetensors"),  # absolute, does not
    ):
        edit(config, weights=name)
        model = tiny_model("llama")
        with pytest.raises(peftlab.AdapterFileError, match=CONFINED) as err:
            peftlab.load_adapter(model, tmp_path / "ad")
        assert not hasattr(model, "peftlab_adapters")
        messages.append(str(err.value).replace(repr(name), "NAME"))
    assert len(set(messages)) == 1, messages  # the same error whether or not the target exists
    # a link inside the folder that points out is refused the same way
    (tmp_path / "ad" / "link.safetensors").symlink_to(secret)
    edit(config, weights="link.safetensors")
    with pytest.raises(peftlab.AdapterFileError, match=CONFINED):
        peftlab.load_adapter(tiny_model("llama"), tmp_path / "ad")


def test_crafted_manifest_lists_no_outside_folder(tmp_path):
    peftlab.save_adapter(lora(names=("a", "b")), tmp_path / "two")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "private-file-name.txt").write_text("x")
    index = tmp_path / "two" / "adapters.json"
    raw = json.loads(index.read_text())
    for folder in (str(tmp_path / "elsewhere"), "../elsewhere"):
        raw["records"]["a"]["folder"] = folder
        index.write_text(json.dumps(raw))
        with pytest.raises(peftlab.AdapterFileError, match=CONFINED) as err:
            peftlab.load_adapter(tiny_model("llama"), tmp_path / "two")
        assert "private-file-name" not in str(err.value)
    del raw["records"]  # an older manifest: names only, used as sub-folder names
    raw["adapters"] = ["../elsewhere"]
    index.write_text(json.dumps(raw))
    with pytest.raises(peftlab.AdapterFileError, match=CONFINED) as err:
        peftlab.load_adapter(tiny_model("llama"), tmp_path / "two")
    assert "private-file-name" not in str(err.value)


def test_hf_sub_folders_are_confined(tmp_path):
    peftlab.export_peft(lora(), tmp_path / "outside")
    peftlab.export_peft(lora(), tmp_path / "hf")
    (
        tmp_path / "hf" / "peftlab_export.json"
    ).unlink()  # as peft's own save_pretrained writes it: sub-folders scanned
    (tmp_path / "hf" / "sneaky").symlink_to(tmp_path / "outside", target_is_directory=True)
    model = tiny_model("llama")
    with pytest.raises(peftlab.AdapterFileError, match=CONFINED):
        peftlab.import_peft(model, tmp_path / "hf")
    assert not hasattr(model, "peftlab_adapters")
    (tmp_path / "empty").mkdir()
    with pytest.raises(peftlab.AdapterFileError, match=CONFINED):
        peftlab.import_peft(tiny_model("llama"), tmp_path / "empty", adapter_name="../outside")


def test_lock_lives_inside_the_folder_and_links_are_not_followed(tmp_path):
    peftlab.save_adapter(lora(), tmp_path / "ad")
    assert (tmp_path / "ad" / ".peftlab.lock").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # nothing beside the folder
    (tmp_path / "ad2").mkdir()
    target = tmp_path / "target.txt"
    (tmp_path / "ad2" / ".peftlab.lock").symlink_to(target)
    with pytest.raises(peftlab.AdapterFileError, match="symbolic link"):
        peftlab.save_adapter(lora(), tmp_path / "ad2")
    assert not target.exists()  # the link was not followed (not even to create its target)
    assert not list((tmp_path / "ad2").glob("adapter*"))


USER_FILES = {
    "adapter-best-step900.safetensors": b"best",
    ".tmp_notes": b"notes",
    "x.tmp": b"x",
    ".adapter_config.json.123.tmp": b"looks like an old temporary",
    "adapter-0123456789abcdef.safetensors": b"a user's copy under a name like ours",
    "README.md": b"readme",
}


def test_saves_remove_only_files_the_previous_save_named(tmp_path):
    path = tmp_path / "ad"
    path.mkdir()
    for name, data in USER_FILES.items():
        (path / name).write_bytes(data)
    model = lora(1.0)
    for v in (1.0, 2.0, 3.0):
        set_version(model, v)
        peftlab.save_adapter(model, path)
        assert version(peftlab.load_adapter(tiny_model("llama"), path)) == v
        ours = {p.name for p in path.iterdir()} - set(USER_FILES)
        assert len(ours) == 3 and {".peftlab.lock", "adapter_config.json"} < ours, ours
    for name, data in USER_FILES.items():
        assert (path / name).read_bytes() == data, name
    # a config that claims a user's file as its weights does not make the next save delete it
    (path / "precious.safetensors").write_bytes(b"p")
    edit(path / "adapter_config.json", weights="precious.safetensors")
    peftlab.save_adapter(model, path)
    assert (path / "precious.safetensors").read_bytes() == b"p"
    # a multi-adapter save and back: still only ours
    peftlab.save_adapter(lora(names=("a", "b")), path)
    peftlab.save_adapter(model, path)
    for name, data in USER_FILES.items():
        assert (path / name).read_bytes() == data, name


def test_formats_never_overwrite_each_other(tmp_path):
    model = lora(2.0)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    peftlab.save_adapter(model, tmp_path / "ours")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ours").iterdir()}
    with pytest.raises(
        peftlab.AdapterFileError, match=r"holds a peftlab adapter.*sub-folder, e\.g\. .*ours/peft"
    ):
        peftlab.export_peft(model, tmp_path / "ours")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ours").iterdir()} == before
    fresh = peftlab.load_adapter(tiny_model("llama"), tmp_path / "ours")
    torch.testing.assert_close(fresh(input_ids=IDS).logits, want)
    peftlab.export_peft(model, tmp_path / "ours" / "peft")  # the way the message gives: both kept
    peftlab.load_adapter(tiny_model("llama"), tmp_path / "ours")
    peftlab.import_peft(tiny_model("llama"), tmp_path / "ours" / "peft")

    peftlab.export_peft(model, tmp_path / "hf")
    with pytest.raises(
        peftlab.AdapterFileError, match=r"holds a HF PEFT adapter.*sub-folder, e\.g\. .*hf/peftlab"
    ):
        peftlab.save_adapter(model, tmp_path / "hf")
    peftlab.import_peft(tiny_model("llama"), tmp_path / "hf")
    peftlab.save_adapter(lora(names=("a", "b")), tmp_path / "two")
    with pytest.raises(
        peftlab.AdapterFileError, match=r"holds a peftlab adapter"
    ):  # our multi-adapter layout
        peftlab.export_peft(model, tmp_path / "two")
    peftlab.save_adapter(lora(names=("b",)), tmp_path / "mixed" / "c")  # ours in the sub-folder of adapter c
    with pytest.raises(peftlab.AdapterFileError, match=r"mixed/c holds a peftlab adapter"):
        peftlab.export_peft(lora(names=("default", "b", "c")), tmp_path / "mixed")
    assert sorted(p.name for p in (tmp_path / "mixed").iterdir()) == [".peftlab.lock", "c"]  # nothing written
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "adapter_config.json").write_text('{"something": "else"}')
    with pytest.raises(
        peftlab.AdapterFileError, match=r"not a peftlab adapter config; refusing to overwrite"
    ):
        peftlab.save_adapter(model, tmp_path / "foreign")
    assert os.path.getsize(tmp_path / "foreign" / "adapter_config.json") == len('{"something": "else"}')


def test_format_version_is_checked(tmp_path):
    peftlab.save_adapter(lora(), tmp_path / "ad")
    for bad in (99, 3, "2", True, None):
        edit(tmp_path / "ad" / "adapter_config.json", format_version=bad)
        with pytest.raises(
            peftlab.AdapterFileError, match=r"format_version .* valid versions: 1, 2. Upgrade peftlab"
        ):
            peftlab.load_adapter(tiny_model("llama"), tmp_path / "ad")
    peftlab.save_adapter(lora(names=("a", "b")), tmp_path / "two")
    edit(tmp_path / "two" / "adapters.json", format_version=99)
    with pytest.raises(peftlab.AdapterFileError, match=r"format_version 99.*valid versions: 1, 2"):
        peftlab.load_adapter(tiny_model("llama"), tmp_path / "two")


def test_a_file_where_the_folder_should_be_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(peftlab.AdapterFileError, match="exists and is not a folder"):
        peftlab.save_adapter(lora(), tmp_path / "file")
    with pytest.raises(peftlab.AdapterFileError, match="exists and is not a folder"):
        peftlab.export_peft(lora(), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


def test_save_merged_never_writes_into_an_adapter_folder(tmp_path):
    model = lora(0.1)
    peftlab.save_adapter(model, tmp_path / "ours")
    peftlab.export_peft(model, tmp_path / "hf")
    for folder in ("ours", "hf"):
        before = sorted(p.name for p in (tmp_path / folder).iterdir())
        with pytest.raises(peftlab.AdapterFileError, match="holds an adapter.*another folder"):
            peftlab.save_merged(model, tmp_path / folder)
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == before
    peftlab.save_merged(model, tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()
