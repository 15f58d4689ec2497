"""Every method on every common architecture: one matrix, each cell works or refuses with a reason.

A cell (architecture x method) works when, on a tiny random model of that architecture with the
method's *default* targets:

* the wrapped model computes the base model at init (prefix: with the adapter disabled, it has no
  identity init);
* a forward and a backward give gradients to the adapter only;
* merged == unmerged (LoRA, AdaLoRA, prefix's folded table), or merge is refused for bottlenecks;
* save_adapter / load_adapter onto a fresh base reproduces the logits;
* for the methods HF PEFT has (LoRA, AdaLoRA, prefix): ``peft.PeftModel.from_pretrained`` on a fresh
  base loads our export with logits equal to ours (1e-5, times the logits' scale where it exceeds 1), and
  ``import_peft`` of the adapter peft saves gives peft's logits.

Otherwise ``wrap`` must refuse with a peftlab error that says why; the reason is the cell. The
table in docs/architectures.md (between the ``arch-matrix`` markers) is this test's output:
``.venv/bin/python scripts/arch_matrix.py`` rewrites it, and ``test_readme_table_is_the_matrix``
fails when they differ.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from arch_zoo import ARCHS, build, inputs, logits, loss_kwargs

import peftlab
from helpers import perturb
from peftlab.core.structure import structure
from peftlab.core.targeting import default_targets
from peftlab.util.errors import MergeError, PeftlabError

METHODS = ["LoRA", "AdaLoRA", "prefix", "Houlsby", "Pfeiffer", "parallel"]
PEFT_METHODS = {"LoRA", "AdaLoRA", "prefix"}
MERGEABLE = {"LoRA", "AdaLoRA", "prefix"}
README = Path(__file__).resolve().parents[2] / "docs" / "architectures.md"
BEGIN, END = "<!-- arch-matrix:begin -->", "<!-- arch-matrix:end -->"


HEAD_TASKS = ("seq-cls", "image-cls", "audio-cls")


def _config(method: str, label: str):
    heads = structure(build(label)).head if ARCHS[label].task in HEAD_TASKS else None
    if method == "LoRA":
        return peftlab.LoraConfig(r=4, alpha=8, modules_to_save=heads)
    if method == "AdaLoRA":
        return peftlab.AdaLoraConfig(init_r=4, target_r=2, total_steps=10, modules_to_save=heads)
    if method == "prefix":
        return peftlab.PrefixConfig(num_virtual_tokens=3, projection_dim=8, modules_to_save=heads)
    return peftlab.AdapterConfig(style=method.lower(), bottleneck_size=4, modules_to_save=heads)


def _logits(model, label: str) -> torch.Tensor:
    with torch.no_grad():
        return logits(model(**inputs(label))).float()


def _close(a: torch.Tensor, b: torch.Tensor, atol: float, what: str) -> None:
    """|a − b| ≤ atol, in units of the logits' scale where they exceed 1 (mT5's untied head gives logits of ~20,
    whose float32 rounding in a merge is ~1e-5)."""
    diff = (a - b).abs().max().item()
    tol = atol * max(1.0, b.abs().max().item())
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:g}"


#: What HF PEFT itself cannot run (its message, matched), with the reason shown under the table.
PEFT_CANNOT = {
    "does not support past key values": (
        "HF PEFT loads this export but can't run it: its prefix tuning passes past_key_values, which transformers 5's "
        "sequence classifiers don't take (checked: peftlab's import of peft's re-save gives our logits)"
    ),
    "The shape of the mask": (
        "HF PEFT loads this export but can't run it: its prefix lengthens the attention mask by the virtual tokens, "
        "and Qwen2-VL's multimodal RoPE indexes input_ids with that mask (checked: peftlab's import of peft's "
        "re-save gives our logits)"
    ),
    "Cannot get conv state for non linear attention layer": (
        "HF PEFT loads this export but can't run it: its prefix passes a key/value cache layer for every layer, and "
        "the hybrid stack's linear-attention layers read their own convolution state from the cache (checked: "
        "peftlab's import of peft's re-save gives our logits)"
    ),
}


#: What HF PEFT drops with a warning, and so computes other logits (its warning, matched), with the note. The export
#: is then checked without what peft drops, where both compute the same model (see _equal_without).
PEFT_DROPS = {
    "Token type ids are not supported": (
        "HF PEFT loads this export but drops token_type_ids under prefix tuning (its warning), so PaliGemma's image "
        "and prompt tokens no longer attend to each other (checked: without them, in eager attention, causal in "
        "both, its logits equal ours, and peftlab's import of peft's re-save gives our logits)"
    ),
}


def _equal_without(label: str, tmp: Path) -> None:
    """Our saved adapter and HF PEFT's load of our export give the same logits on inputs without token_type_ids, in
    eager attention (transformers' SDPA path skips PaliGemma's causal mask when it has no token types)."""
    import peft

    def eager():
        base = build(label)
        base.set_attn_implementation("eager")
        return base

    x = {k: v for k, v in inputs(label).items() if k != "token_type_ids"}
    ours = peftlab.load_adapter(eager(), tmp / "ours")
    theirs = peft.PeftModel.from_pretrained(eager(), str(tmp / "export")).eval()
    with torch.no_grad():
        _close(logits(theirs(**x)).float(), logits(ours(**x)).float(), 1e-5, "HF PEFT without what it drops")


def _peft_round_trip(model, label: str, ours: torch.Tensor, tmp: Path) -> str | None:
    """peft loads our export with our logits; we import the adapter peft saves with peft's logits.
    Returns a note when peft loads the export but cannot run the model (see PEFT_CANNOT)."""
    import peft

    try:
        peftlab.export_peft(model, tmp / "export")
    except peftlab.ConfigError as exc:  # HF PEFT can't hold or run this adapter: the reason is the note
        if "HF PEFT can't" not in str(exc):
            raise
        return str(exc)
    theirs_model = peft.PeftModel.from_pretrained(build(label), str(tmp / "export")).eval()
    note = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            theirs = _logits(theirs_model, label)
        note = next((v for k, v in PEFT_DROPS.items() if any(k in str(w.message) for w in caught)), None)
        if note is not None:
            _equal_without(label, tmp)
            theirs = ours
        _close(theirs, ours, 1e-5, "HF PEFT loading our export")
    except (ValueError, IndexError) as exc:
        note = next((v for k, v in PEFT_CANNOT.items() if k in str(exc)), None)
        if note is None:
            raise
        theirs = ours
    theirs_model.save_pretrained(str(tmp / "peft"))
    back = peftlab.import_peft(build(label), tmp / "peft")
    _close(_logits(back, label), theirs, 1e-5, "import_peft of HF PEFT's save")
    return note


def run_cell(label: str, method: str) -> str:
    """'✓' when every check passes, else the reason ``wrap`` gave for refusing (assertions fail the test)."""
    base_model = build(label)
    base = _logits(base_model, label)
    model = build(label)
    try:
        peftlab.wrap(model, _config(method, label))
    except PeftlabError as exc:
        assert not peftlab.list_adapters(model), "a refused wrap must leave the model unwrapped"
        return f"✗ {exc}"
    if method == "prefix":  # attends to n learned tokens from the start: no identity init exists
        with peftlab.disable_adapters(model):
            _close(_logits(model, label), base, 1e-5, "disabled prefix == base")
    else:
        _close(_logits(model, label), base, 1e-6, "identity at init")
    perturb(model, 0.2)
    ours = _logits(model, label)
    assert (ours - base).abs().max() > 1e-4, "a perturbed adapter must change the output"

    model.train()
    loss = model(**inputs(label), **loss_kwargs(label)).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads and set(grads) <= trainable, sorted(set(grads) - trainable)[:3]
    assert any(g.abs().sum() > 0 for g in grads.values())
    model.zero_grad(set_to_none=True)
    model.eval()

    if method in MERGEABLE:
        peftlab.merge(model)
        _close(_logits(model, label), ours, 1e-5, "merged == unmerged")
        peftlab.unmerge(model)
    else:
        with pytest.raises(MergeError, match="cannot be merged"):
            peftlab.merge(model)
    _close(_logits(model, label), ours, 1e-5, "after unmerge")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        peftlab.save_adapter(model, tmp / "ours")
        fresh = peftlab.load_adapter(build(label), tmp / "ours")
        _close(_logits(fresh, label), ours, 1e-6, "save/load round trip")
        note = _peft_round_trip(model, label, ours, tmp) if method in PEFT_METHODS else None
    return f"✓ {note}" if note else "✓"


_RESULTS: dict[tuple[str, str], str] = {}


def cell(label: str, method: str) -> str:
    if (label, method) not in _RESULTS:
        _RESULTS[(label, method)] = run_cell(label, method)
    return _RESULTS[(label, method)]


@pytest.mark.parametrize("label", list(ARCHS))
def test_architecture_row(label):
    for method in METHODS:
        outcome = cell(label, method)
        if outcome.startswith("✗"):  # a refusal must say why, in words
            assert len(outcome) > 40 and ("can't" in outcome or "cannot" in outcome or "no " in outcome), outcome


# ---- the README table ----------------------------------------------------------------------------------


def _short(reason: str) -> str:
    """The first sentence of an error message (or a note), for the notes under the table."""
    text = reason[1:].strip()
    return re.split(r"(?<=[.;])\s", text, maxsplit=1)[0].rstrip(".;")


def _peft_default(label: str) -> str:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

    targets = peft_map.get(build(label).config.model_type)
    return ", ".join(targets) if isinstance(targets, list) else "none"


def render() -> str:
    """The markdown table (rows: architectures, columns: methods) and the numbered refusal reasons."""
    notes: list[str] = []
    lines = [
        "| architecture | head | " + " | ".join(METHODS) + " | LoRA default targets | HF PEFT's default |",
        "|---" * (len(METHODS) + 4) + "|",
    ]
    for label, arch in ARCHS.items():
        row = []
        for method in METHODS:
            outcome = cell(label, method)
            if outcome == "✓":
                row.append("✓")
                continue
            note = _short(outcome)
            if note not in notes:
                notes.append(note)
            row.append(f"{outcome[0]} ({notes.index(note) + 1})")
        targets = default_targets(build(label))
        ours = ", ".join(dict.fromkeys(t.rsplit(".", 1)[-1] for t in targets))
        if any("." in t for t in targets):  # full paths: a VLM's language model, named apart from its other towers
            ours += " (language model)"
        theirs = _peft_default(label)
        lines.append(f"| {label} | {arch.task} | " + " | ".join(row) + f" | {ours} | {theirs} |")
    lines.append("")
    lines += [f"({i}) {note}." for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


def readme_section() -> str | None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def write_readme(table: str) -> None:
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def test_readme_table_is_the_matrix():
    table = render()
    assert readme_section() == table, (
        "docs/architectures.md's architecture matrix differs from the test's output; run "
        "`.venv/bin/python scripts/arch_matrix.py` to rewrite it"
    )


# ---- prefix specifics: fused qkv and encoder-decoder generation, positions, checkpointing --------------


@pytest.mark.parametrize("label", ["GPT-2", "GPT-NeoX", "Phi-3", "T5", "BART", "BLOOM"])
def test_prefix_generation_cached_equals_uncached(label):
    torch.manual_seed(0)
    model = peftlab.wrap(build(label), peftlab.PrefixConfig(num_virtual_tokens=3, projection_dim=8))
    perturb(model, 0.5)
    x = {k: v for k, v in inputs(label).items() if k != "decoder_input_ids"}
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**x, **kw)
        uncached = model.generate(**x, use_cache=False, **kw)
    assert torch.equal(cached, uncached), (cached, uncached)


def test_prefix_positions_left_are_named():
    """BERT's learned positions: the prefix takes n of them; a too-long input says how many are left."""
    model = peftlab.wrap(build("BERT"), peftlab.PrefixConfig(num_virtual_tokens=20))
    limit = model.config.max_position_embeddings
    ids = torch.randint(3, 90, (1, limit))
    with pytest.raises(peftlab.ConfigError, match=rf"at most {limit - 20} tokens with this prefix, got {limit}"):
        model(input_ids=ids)
    model(input_ids=ids[:, : limit - 20])  # what is left fits


@pytest.mark.parametrize("label", ["Llama", "GPT-2", "BERT"])
def test_prefix_reentrant_checkpointing_gives_the_same_gradients(label):
    """A projected prefix under use_reentrant=True checkpointing: no "backward through the graph a second
    time", and every layer's prefix gets the gradient it gets without checkpointing."""

    def grads(checkpointing: bool) -> dict:
        model = build(label)
        torch.manual_seed(0)
        peftlab.wrap(model, peftlab.PrefixConfig(num_virtual_tokens=3, projection_dim=8))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        for m in model.modules():  # compare gradients, not dropout draws
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model(**inputs(label), **loss_kwargs(label)).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert sorted(plain) == sorted(ckpt)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_prefix_encoder_decoder_refuses_checkpointing_with_reason():
    model = peftlab.wrap(build("T5"), peftlab.PrefixConfig(num_virtual_tokens=3))
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(peftlab.ConfigError, match="can't train with gradient checkpointing.*KV cache"):
        model(**inputs("T5"), **loss_kwargs("T5"))


# ---- structural defaults count like HF PEFT for the same target names ---------------------------------


@pytest.mark.parametrize("label", ["GPT-2", "BLOOM", "Phi-3", "T5", "DistilBERT", "DeBERTa-v2"])
def test_default_targets_count_like_hf_peft_with_the_same_names(label):
    import peft

    ours = peftlab.wrap(build(label), peftlab.LoraConfig(r=4))
    names = default_targets(build(label))
    theirs = peft.get_peft_model(build(label), peft.LoraConfig(r=4, target_modules=names))
    assert peftlab.count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
