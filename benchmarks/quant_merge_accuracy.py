"""Merge accuracy: a LoRA adapter trained on a quantized MiniLM (SST-2), merged into the quantized base by plain
requantization and by the accurate (error-feedback, calibrated) requantization; test accuracy and per-layer output
error of each.

For each ``--base`` (``nf4``: bitsandbytes NF4 + double quant, QLoRA; ``int8``: bitsandbytes LLM.int8;
``torchao-int8`` / ``torchao-int4``; ``mxfp4``) and seed: load MiniLM-L6 quantized, LoRA r=8 / alpha=16 on every encoder
linear (classifier trained in full), ``--steps`` AdamW steps (lr 2e-3, batch ``--batch``, ≤ 64 tokens, batches
of similar lengths) on SST-2 train, then on SST-2 test (872 sentences):

1. accuracy with the adapter unmerged;
2. ``merge_quantized(requantize="plain")`` -> accuracy; unmerge (exact: the packed weights are restored bit for
   bit, checked);
3. ``merge_quantized(requantize="accurate", calibration=..., validation=...)`` -> accuracy, and per layer the
   relative RMS output error of the plain and of the accurate rounding on the calibration sentences
   (``--calib`` training sentences) and on ``--valid`` other training sentences the rounding never sees
   (the plain merge of step 2 measures its own on the same sentences). A format the error-feedback rounding
   cannot re-round (torchao int4 on CUDA, tile-packed) records why and skips step 3.

Training runs on a float copy of the model whose linears hold the *dequantized* quantized weights (made by
``peftlab.dequantize_model`` from the same quantized load), the values the quantized forward computes with;
its trainable weights are then copied into the quantized model, and the largest logit difference between the
two on the first test batch is recorded (``train_copy_max_abs_logit_diff``). Reason: bitsandbytes dequantizes
on the CPU at ~8 s per MiniLM step (batch 16), which made an adapter trained to its usual accuracy over 3 seeds
impossible on the shared machine. Every merge is made in the quantized model; the accuracies are read on the float
copy holding the same weights (the adapter folded in for the unmerged model; the merged quantized model's
dequantized weights for the merges), with the largest logit difference to the quantized model on the first test
batch recorded (``eval_copy_max_abs_logit_diff_<mode>``).

    python benchmarks/quant_merge_accuracy.py --base nf4 --seeds 0 1 2 --out benchmarks/results/quant

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
    "torchao-int4": {"backend": "torchao", "scheme": "int4", "group_size": 64},
    "mxfp4": {"backend": "mxfp4"},
}


def encode(tok, rows, batch_size: int, max_length: int = 64) -> list[dict]:
    import torch

    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = dict(
            tok(
                [r[0] for r in chunk],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        enc["labels"] = torch.tensor([r[1] for r in chunk])
        out.append(enc)
    return out


def bucketed(tok, rows, batch_size: int, seed: int) -> list[dict]:
    """Batches of similar-length sentences (sorted within windows of 16 batches), in a seeded random order:
    less padding, the same sentences."""
    import torch

    window = batch_size * 16
    rows = [
        r for i in range(0, len(rows), window) for r in sorted(rows[i : i + window], key=lambda r: len(r[0]))
    ]
    out = encode(tok, rows, batch_size)
    perm = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return [out[i] for i in perm]


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


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def run(
    base: str, seed: int, steps: int, batch: int, calib_n: int, valid_n: int, damp: float, test_n: int = 0
) -> dict:
    import torch
    from transformers import AutoTokenizer

    import peftlab
    from peftlab.backends.quant.base import backend_of
    from peftlab.bench.tasks import data_dir, read_sst2
    from peftlab.persist.quantized_merge import merge_quantized
    from peftlab.util.errors import MergeError

    warnings.simplefilter("ignore")
    torch.set_num_threads(
        1
    )  # a shared 2-core machine: one thread runs the small ops of the rounding 4x faster
    path = peftlab.resolve_model_path("minilm-l6")
    tok = AutoTokenizer.from_pretrained(path)
    models = []
    for _ in range(2):  # [quantized, float copy of its dequantized weights], wrapped alike
        torch.manual_seed(seed)
        m = peftlab.load_quantized(path, kind="seq-cls", num_labels=2, device="cpu", **BASES[base])
        peftlab.prepare_for_kbit_training(m, use_gradient_checkpointing=False)
        models.append(m)
    model, dense = models
    peftlab.dequantize_model(dense, dtype=torch.float32)
    for m in models:
        torch.manual_seed(seed)
        peftlab.wrap(
            m, peftlab.LoraConfig(r=8, alpha=16, target_modules="all-linear", modules_to_save=["classifier"])
        )
    folder = Path(data_dir())
    train = read_sst2(folder, "train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    need = steps * batch + calib_n + valid_n
    if need > len(train):
        raise SystemExit(f"steps*batch + calib + valid = {need} > {len(train)} training sentences")
    train_batches = bucketed(tok, [train[i] for i in order[: steps * batch]], batch, seed)
    calib = encode(tok, [train[i] for i in order[-calib_n:]], 32)
    valid = encode(tok, [train[i] for i in order[-(calib_n + valid_n) : -calib_n]], 32)
    test_rows = read_sst2(folder, "test")
    test = encode(tok, test_rows[:test_n] if test_n else test_rows, 64)
    opt = torch.optim.AdamW(list(trainable(dense).values()), lr=2e-3)
    log(base, "seed", seed, "loaded; training")
    dense.train()
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        loss = dense(**train_batches[step]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 100 == 0:
            log("step", step, sum(losses[-20:]) / len(losses[-20:]))
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        src = trainable(dense)
        for n, p in trainable(model).items():
            p.copy_(src[n])
    first = {k: v for k, v in test[0].items() if k != "labels"}
    model.eval()
    dense.eval()
    with torch.no_grad():
        gap = (model(**first).logits - dense(**first).logits).abs().max().item()
    result = {"base": base, "seed": seed, "steps": steps, "batch": batch, "calib": calib_n, "valid": valid_n,
              "damp": damp, "train_s_shared_machine": train_s, "train_loss_last20": sum(losses[-20:]) / len(losses[-20:]),
              "train_copy_max_abs_logit_diff": gap}  # fmt: skip
    del opt
    log("trained", train_s, "logit gap", gap)
    result["acc_unmerged"] = accuracy(dense, test)  # the same weights and adapter as `model` (gap above)
    log("acc unmerged", result["acc_unmerged"])
    # Accuracy of a merged quantized model, read on `dense` (the quantized forward dequantizes each layer per
    # batch; bitsandbytes does that slowly on the CPU): fold the adapter into `dense` once, then before each
    # measurement overwrite its base weights with the merged quantized model's dequantized ones.
    peftlab.merge(dense)
    quant_layers = {n: m for n, m in model.named_modules() if backend_of(m) is not None}
    before = stored(model)
    strip = lambda bs: [{k: v for k, v in b.items() if k != "labels"} for b in bs]  # noqa: E731
    for mode in ("plain", "accurate"):
        # both modes measure each layer's error on the calibration and validation sentences (plain only measures)
        extra = {"calibration": strip(calib), "validation": strip(valid), "damp": damp}
        try:
            report = merge_quantized(model, None, requantize=mode, **extra)
        except MergeError as exc:  # a format the error-feedback rounding cannot re-round (torchao int4 on CUDA)
            if peftlab.is_merged(model):
                raise
            result[f"acc_{mode}"] = None
            result[f"{mode}_unavailable"] = str(exc)
            result[f"unmerge_exact_after_{mode}"] = None
            log(mode, "unavailable:", exc)
            continue
        log("merged", mode)
        with torch.no_grad():
            for n, m in quant_layers.items():
                dense.get_submodule(n).weight.copy_(backend_of(m).dequantize(m).float())
            gap = (model(**first).logits - dense(**first).logits).abs().max().item()
        result[f"eval_copy_max_abs_logit_diff_{mode}"] = gap
        result[f"acc_{mode}"] = accuracy(dense, test)
        log("acc", mode, result[f"acc_{mode}"], "gap", gap)
        result[f"report_{mode}"] = {k: v for k, v in report.items() if k != "layers"}
        result[f"layers_{mode}"] = {
            p: {
                k: e[k]
                for k in ("calib_rel_plain", "calib_rel", "valid_rel_plain", "valid_rel", "rel")
                if k in e
            }
            for p, e in report["layers"].items()
        }
        peftlab.unmerge(model)
        result[f"unmerge_exact_after_{mode}"] = all(torch.equal(a, b) for a, b in zip(stored(model), before))
    return result


def _mean_ci(xs: list[float]) -> str:
    """mean ± half-width of the 95% t interval (n ≥ 2)."""
    import statistics

    t95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571}
    m = statistics.mean(xs)
    if len(xs) < 2:
        return f"{m:.2f}"
    half = t95.get(len(xs), 2.0) * statistics.stdev(xs) / len(xs) ** 0.5
    return f"{m:.2f} ± {half:.2f}"


def table(results: list[dict]) -> str:
    r0 = results[0]
    lines = [
        f"## {r0['base']} base ({dt.date.today().isoformat()}; seeds {', '.join(str(r['seed']) for r in results)}; "
        f"{r0['steps']} steps × batch {r0['batch']}; calibration {r0['calib']} / validation {r0['valid']} sentences; "
        f"damp {r0['damp']})",
        "",
        "Test accuracy (%, 872 sentences) and mean per-layer relative RMS output error, plain → accurate "
        "requantization, on the calibration sentences and on the validation sentences the rounding never saw.",
        "",
        "| seed | unmerged | plain merge | accurate merge | layer error, calibration | layer error, validation "
        "| layers halved (validation) | unmerge bit-exact |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.get("acc_accurate") is None:  # no accurate requantization for this format
            lines.append(
                f"| {r['seed']} | {100 * r['acc_unmerged']:.2f} | {100 * r['acc_plain']:.2f} | n/a (not re-roundable) "
                f"| {100 * r['report_plain']['calib_rel_plain_mean']:.2f}% (plain) "
                f"| {100 * r['report_plain']['valid_rel_plain_mean']:.2f}% (plain) | | {r['unmerge_exact_after_plain']} |"
            )
            continue
        a = r["report_accurate"]
        lines.append(
            f"| {r['seed']} | {100 * r['acc_unmerged']:.2f} | {100 * r['acc_plain']:.2f} | {100 * r['acc_accurate']:.2f} "
            f"| {100 * a['calib_rel_plain_mean']:.2f}% → {100 * a['calib_rel_mean']:.2f}% "
            f"| {100 * a['valid_rel_plain_mean']:.2f}% → {100 * a['valid_rel_mean']:.2f}% "
            f"| {a['valid_layers_halved']}/{a['quantized_layers']} "
            f"| {r['unmerge_exact_after_plain'] and r['unmerge_exact_after_accurate']} |"
        )
    if any(r.get("acc_accurate") is None for r in results):
        lines += ["", "Accurate requantization unavailable: " + results[0].get("accurate_unavailable", "")]
    elif len(results) > 1:
        col = lambda f: _mean_ci([f(r) for r in results])  # noqa: E731
        lines.append(
            f"| mean ± 95% CI | {col(lambda r: 100 * r['acc_unmerged'])} | {col(lambda r: 100 * r['acc_plain'])} "
            f"| {col(lambda r: 100 * r['acc_accurate'])} "
            f"| {col(lambda r: 100 * r['report_accurate']['calib_rel_plain_mean'])}% → "
            f"{col(lambda r: 100 * r['report_accurate']['calib_rel_mean'])}% "
            f"| {col(lambda r: 100 * r['report_accurate']['valid_rel_plain_mean'])}% → "
            f"{col(lambda r: 100 * r['report_accurate']['valid_rel_mean'])}% | | |"
        )
        lines += [
            "",
            "Paired differences (percentage points, mean ± 95% CI over seeds): plain − unmerged "
            f"{_mean_ci([100 * (r['acc_plain'] - r['acc_unmerged']) for r in results])}, accurate − unmerged "
            f"{_mean_ci([100 * (r['acc_accurate'] - r['acc_unmerged']) for r in results])}, accurate − plain "
            f"{_mean_ci([100 * (r['acc_accurate'] - r['acc_plain']) for r in results])}.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=sorted(BASES), default="nf4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--valid", type=int, default=256)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--suffix", default="", help="appended to the JSON name")
    parser.add_argument("--test-n", type=int, default=0, help=argparse.SUPPRESS)  # smoke runs only
    parser.add_argument("--out", default="benchmarks/results/quant")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        results.append(
            run(args.base, seed, args.steps, args.batch, args.calib, args.valid, args.damp, args.test_n)
        )
        print({k: v for k, v in results[-1].items() if not k.startswith("layers_")}, flush=True)
        (out / f"merge_accuracy_{args.base}{args.suffix}.json").write_text(json.dumps(results, indent=1))
    md = out / "merge_accuracy.md"
    text = md.read_text() if md.exists() else (
        "# Merging a LoRA into its quantized base: plain vs accurate requantization (MiniLM-L6, SST-2 test, CPU)\n\n"
        "Layer error: relative RMS of the layer's output error, mean over the quantized layers. Command: see COMMAND.\n\n"
    )  # fmt: skip
    md.write_text(text + table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
