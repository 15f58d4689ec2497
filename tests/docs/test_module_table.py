"""The module-type table of docs/guide.md ("What each method can target") says what the code accepts.

For every row, the LoRA, DoRA and AdaLoRA cells are checked against ``peftlab.wrap`` on a tiny model holding that
module type: a cell that starts with ✓ must wrap, one that says "refused" or "no" must raise a clear error (or have
no option that could ask for it). The table must name every module type LoRA adapts (``is_lora_target``), no row
may be unknown here, and the test file each row names must exist. Parity with HF PEFT is what those files check.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from arch_zoo import build
from torch import nn

import peftlab
from peftlab.methods.lora.method import is_lora_target
from peftlab.util.errors import PeftlabError

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "guide.md"
COLUMNS = ("LoRA", "DoRA", "AdaLoRA")


def table() -> dict[str, dict[str, str]]:
    """{row label: {column: cell}} of the table under "## What each method can target"."""
    text = GUIDE.read_text().split("## What each method can target", 1)[1].splitlines()
    start = next(i for i, line in enumerate(text) if line.startswith("|"))
    end = next((i for i in range(start, len(text)) if not text[i].startswith("|")), len(text))
    lines = text[start:end]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"c1": nn.Conv1d(3, 4, 3), "c2": nn.Conv2d(3, 4, 3), "c3": nn.Conv3d(3, 4, 2)})])


class Mha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"attn": nn.MultiheadAttention(16, 4)})])


def _lora(model, **kw):
    def run(column):
        if column == "AdaLoRA":  # a TypeError where AdaLoraConfig has no such option (parameters, tokens)
            config = peftlab.AdaLoraConfig(init_r=4, target_r=2, total_steps=10, **kw)
        else:
            config = peftlab.LoraConfig(r=4, use_dora=column == "DoRA", **kw)
        return peftlab.wrap(model(), config)

    return run


#: row label -> wrap(column) on a tiny model holding that module type (None: the row makes no per-column claim)
PROBES = {
    "`nn.Linear`": _lora(lambda: build("Llama"), target_modules=["q_proj"]),
    "GPT-2 `Conv1D`": _lora(lambda: build("GPT-2"), target_modules=["c_attn"]),
    "`nn.Embedding`": _lora(lambda: build("Llama"), target_modules=["embed_tokens"]),
    "`nn.Conv1d/2d/3d`": _lora(Convs, target_modules=["c1", "c2", "c3"]),
    "`nn.MultiheadAttention`": _lora(Mha, target_modules=["attn"]),
    "3-D expert parameters (MoE)": _lora(lambda: build("Qwen3-MoE"), target_parameters=["experts.gate_up_proj"]),
    "a non-linear module's 2-D weight (router)": _lora(lambda: build("Qwen3-MoE"), target_parameters=["mlp.gate.weight"]),
    "embedding rows (trainable tokens)": _lora(lambda: build("Llama"), target_modules=["q_proj"], trainable_token_indices=[5]),
    "tied output head / input embedding": None,
}
#: the module types each row stands for (every type LoRA adapts by module must have one)
TYPES = {
    "`nn.Linear`": nn.Linear(2, 2),
    "`nn.Embedding`": nn.Embedding(2, 2),
    "`nn.Conv1d/2d/3d`": nn.Conv2d(2, 2, 1),
    "`nn.MultiheadAttention`": nn.MultiheadAttention(4, 1),
}


def claim(cell: str) -> bool | None:
    """True for ✓, False for "refused"/"no", None for an empty cell."""
    if not cell:
        return None
    if cell.startswith("✓"):
        return True
    if cell.startswith(("refused", "no")):
        return False
    raise AssertionError(f"cell {cell!r} is neither ✓ nor refused/no")


def test_the_table_has_a_row_per_module_type_and_names_existing_tests():
    rows = table()
    assert set(rows) == set(PROBES), f"rows without a probe here (or probes without a row): {set(rows) ^ set(PROBES)}"
    for label, module in TYPES.items():
        assert is_lora_target(module), label
    for cell in (row["test"] for row in rows.values()):
        for path in re.findall(r"`([^`]+\.py)`", cell):
            assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("label", [k for k, v in PROBES.items() if v is not None])
def test_each_cell_says_what_wrap_accepts(label):
    row = table()[label]
    for column in COLUMNS:
        expected = claim(row[column])
        if expected is None:
            continue
        try:
            with torch.no_grad():
                PROBES[label](column)
            accepted = True
        except (PeftlabError, TypeError):  # refused with a reason, or no such option in that config
            accepted = False
        assert accepted == expected, f"{label} / {column}: the table says {row[column]!r}, wrap {'accepts' if accepted else 'refuses'} it"
