"""Exact match on the 872 SST-2 test sentences of an intermediate ``peftlab train`` checkpoint of
``sst2_sft.py`` (``OUT/checkpoint/trainable-<step>.safetensors``): for a run that the shared CPU makes
too slow to finish in a session, this scores the state it has reached.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/own_task/sst2_sft_checkpoint.py /tmp/sst2-sft-XXXX/train/checkpoint

Writes benchmarks/results/own_task/sst2_sft_step<step>.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, sst2_rows, write_instructions  # noqa: E402
from sst2_sft import MAX_LEN, RANK  # noqa: E402


def main(folder: str) -> None:
    import torch
    from safetensors.torch import load_file

    import peftlab
    import peftlab.data
    from peftlab.data.sft import generate_answers

    torch.set_num_threads(1)
    state = json.loads((Path(folder) / "state.json").read_text())
    model, tokenizer = peftlab.load_model("smollm2-135m")
    peftlab.wrap(model, peftlab.LoraConfig(r=RANK, alpha=2 * RANK, dropout=0.05, target_modules="all-linear"))
    weights = load_file(str(Path(folder) / state["files"]["trainable"]))
    params = dict(model.named_parameters())
    assert set(weights) == {n for n, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        test = write_instructions(sst2_rows("test"), Path(tmp) / "test.jsonl")
        data = peftlab.data.prepare("sft", tokenizer, test, max_length=MAX_LEN)
    metas = data.train.meta
    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, [m["prompt_ids"] for m in metas], 3, 64)
    hits = [int(" ".join(a.split()) == m["reference"]) for a, m in zip(answers, metas)]
    result = {
        "checkpoint_step": state["step"],
        "of_steps": state["fingerprint"]["steps"],
        "test_rows": len(hits),
        "exact_match": sum(hits) / len(hits),
        "answers_not_a_label": sum(" ".join(a.split()) not in ("positive", "negative") for a in answers),
        "eval_seconds": time.perf_counter() - start,
        "fingerprint": state["fingerprint"],
    }
    result["fingerprint"] = {k: v for k, v in result["fingerprint"].items() if k not in ("data", "eval_data")}
    (RESULTS / f"sst2_sft_step{state['step']}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
