"""Merge accuracy: a LoRA adapter trained on a quantized MiniLM (SST-2), merged into the quantized base by plain
requantization and by the accurate (error-feedback, calibrated) requantization; test accuracy and per-layer output
error of each.

For each ``--base`` (``nf4``: bitsandbytes NF4 + double quant, QLoRA; ``int8``: bitsandbytes LLM.int8;
``torchao-int8``) and seed: load MiniLM-L6 quantized, LoRA r=8 / alpha=16 on every encoder linear (classifier
trained in full), ``--steps`` AdamW steps (lr 2e-3, batch 16, ≤ 64 tokens) on SST-2 train, then on SST-2 test
(872 sentences):

1. accuracy with the adapter unmerged;
2. ``merge_quantized(requantize="plain")`` -> accuracy, per-layer relative RMS output error on the calibration
   batch (``--calib`` training sentences, disjoint from the steps' order start); unmerge (exact: the packed
   weights are restored bit for bit, checked);
3. ``merge_quantized(requantize="accurate")`` -> the same.

    python benchmarks/quant_merge_accuracy.py --base nf4 --seeds 0 --out benchmarks/results/quant

Writes ``merge_accuracy_<base>.json`` and appends its table to ``merge_accuracy.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
import warnings
from pathlib import Path

BASES = {
    "nf4": {"bits": 4, "quant_type": "nf4", "double_quant": True},
    "int8": {"bits": 8},
    "torchao-int8": {"backend": "torchao", "scheme": "int8"},
}


def encode(tok, rows, batch_size: int, max_length: int = 64) -> list[dict]:
    import torch

    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = dict(tok([r[0] for r in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        enc["labels"] = torch.tensor([r[1] for r in chunk])
        out.append(enc)
    return out


def accuracy(model, batches) -> float:
    import torch

    model.eval()
    right = total = 0
    with torch.no_grad():
        for b in batches:
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
            right += (logits.argmax(-1) == b["labels"]).sum().item()
            total += len(b["labels"])
    return right / total


def stored(model) -> list:
    from peftlab.backends.quant.base import backend_of

    out = []
    for m in model.modules():
        if backend_of(m) is not None:
            w = m.weight
            out.append(getattr(w, "qdata", w.data).clone())
    return out


def log(*args) -> None:
    import sys

    print(time.strftime("%H:%M:%S"), *args, file=sys.stderr, flush=True)


def run(base: str, seed: int, steps: int, calib_n: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    import peftlab
    from peftlab.bench.tasks import data_dir, read_sst2
    from peftlab.persist.quantized_merge import merge_quantized

    warnings.simplefilter("ignore")
    torch.manual_seed(seed)
    path = peftlab.resolve_model_path("minilm-l6")
    tok = AutoTokenizer.from_pretrained(path)
    model = peftlab.load_quantized(path, kind="seq-cls", num_labels=2, device="cpu", **BASES[base])
    peftlab.prepare_for_kbit_training(model, use_gradient_checkpointing=False)
    peftlab.wrap(model, peftlab.LoraConfig(r=8, alpha=16, target_modules="all-linear", modules_to_save=["classifier"]))
    folder = Path(data_dir())
    train = read_sst2(folder, "train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    train_batches = encode(tok, [train[i] for i in order[: steps * 16]], 16)
    calib = encode(tok, [train[i] for i in order[-calib_n:]], 32)
    test = encode(tok, read_sst2(folder, "test"), 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    log("loaded; training")
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        loss = model(**train_batches[step % len(train_batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    train_s = time.perf_counter() - t0
    result = {"base": base, "seed": seed, "steps": steps, "train_s_shared_machine": train_s}
    log("trained", train_s)
    result["acc_unmerged"] = accuracy(model, test)
    log("acc unmerged", result["acc_unmerged"])
    before = stored(model)
    calib_inputs = [{k: v for k, v in b.items() if k != "labels"} for b in calib]
    for mode in ("plain", "accurate"):
        report = merge_quantized(model, calib_inputs[0], requantize=mode, calibration=calib_inputs)
        log("merged", mode)
        result[f"acc_{mode}"] = accuracy(model, test)
        log("acc", mode, result[f"acc_{mode}"])
        result[f"report_{mode}"] = {k: v for k, v in report.items() if k != "layers"}
        result[f"layers_{mode}"] = {
            p: {"calib_rel_plain": e["calib_rel_plain"], "calib_rel": e["calib_rel"], "probe_rel": e["rel"]}
            for p, e in report["layers"].items()
        }
        peftlab.unmerge(model)
        result[f"unmerge_exact_after_{mode}"] = all(torch.equal(a, b) for a, b in zip(stored(model), before))
    result["acc_after_unmerge"] = accuracy(model, test)
    return result


def table(results: list[dict]) -> str:
    base = results[0]["base"]
    lines = [
        f"## {base} base ({dt.date.today().isoformat()}; {len(results)} seed(s): {', '.join(str(r['seed']) for r in results)})",
        "",
        "| seed | test acc unmerged | plain merge | accurate merge | mean layer error plain → accurate "
        "| layers with error halved | unmerge bit-exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p, a = r["report_plain"], r["report_accurate"]
        lines.append(
            f"| {r['seed']} | {100 * r['acc_unmerged']:.2f} | {100 * r['acc_plain']:.2f} | {100 * r['acc_accurate']:.2f} "
            f"| {100 * p['calib_rel_mean']:.2f}% → {100 * a['calib_rel_mean']:.2f}% "
            f"| {a['layers_halved']}/{a['quantized_layers']} "
            f"| {r['unmerge_exact_after_plain'] and r['unmerge_exact_after_accurate']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=sorted(BASES), default="nf4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/quant")
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        results.append(run(args.base, seed, args.steps, args.calib))
        print({k: v for k, v in results[-1].items() if not k.startswith("layers_")}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"merge_accuracy_{args.base}.json").write_text(json.dumps(results, indent=1))
    md = out / "merge_accuracy.md"
    text = md.read_text() if md.exists() else (
        "# Merging a LoRA into its quantized base: plain vs accurate requantization (MiniLM-L6, SST-2 test, CPU)\n\n"
        "Layer error: relative RMS of the layer's output error on the calibration batch (128 training sentences), "
        "mean over the quantized layers. Command: see COMMAND.\n\n"
    )  # fmt: skip
    md.write_text(text + table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
