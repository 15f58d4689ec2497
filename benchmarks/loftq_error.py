r"""LoftQ reconstruction error on SmolLM2-135M's linear layers.

    python benchmarks/loftq_error.py [--model smollm2-135m] [--ranks 16 64] [--iters 1 5]
        [--out benchmarks/results/loftq]

For every linear weight W (d_out, d_in) of the model (the tied output head excluded), NF4 with blocks of
64 and no double quantization (HF PEFT's LoftQ quantizer), the relative Frobenius errors

    plain NF4:  ‖W − Q‖ / ‖W‖            LoftQ:  ‖W − (Q' + s·B A)‖ / ‖W‖

where (Q', A, B) = :func:`peftlab.methods.lora.inits.loftq` with rank r and N alternations. Reported per
projection type (mean over the 30 layers) and over all weights (‖·‖ summed in squares). Writes loftq.md,
loftq.json and loftq.png (atomically).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch


def linear_weights(model_name: str) -> dict[str, torch.Tensor]:
    """{path: fp32 (d_out, d_in) weight} of every nn.Linear except the output head."""
    from transformers import AutoModelForCausalLM

    import peftlab

    model = AutoModelForCausalLM.from_pretrained(peftlab.resolve_model_path(model_name), dtype=torch.float32)
    head = model.get_output_embeddings()
    return {
        path: m.weight.detach().float()
        for path, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    }


def measure(weights: dict[str, torch.Tensor], ranks: list[int], iters: list[int]) -> list[dict]:
    from tqdm import tqdm

    from peftlab.methods.lora.inits import _nf4_roundtrip, loftq

    rows = []
    for path, w in tqdm(weights.items(), desc="loftq", file=sys.stderr):
        norm = torch.linalg.matrix_norm(w).item()
        plain = torch.linalg.matrix_norm(w - _nf4_roundtrip(w)).item()
        row = {"path": path, "kind": path.rsplit(".", 1)[-1], "shape": list(w.shape), "norm": norm, "nf4": plain}
        for r in ranks:
            for n in iters:
                deq, a, b = loftq(w, r, 1.0, n)
                row[f"loftq_r{r}_it{n}"] = torch.linalg.matrix_norm(w - (deq + b @ a)).item()
        rows.append(row)
    return rows


def summarize(rows: list[dict], keys: list[str]) -> list[dict]:
    """Per projection kind and overall: relative errors (root of summed squares over summed ‖W‖²)."""
    kinds = sorted({r["kind"] for r in rows}) + ["all"]
    out = []
    for kind in kinds:
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        total = sum(r["norm"] ** 2 for r in sel) ** 0.5
        entry = {"kind": kind, "weights": len(sel), "nf4": sum(r["nf4"] ** 2 for r in sel) ** 0.5 / total}
        for key in keys:
            entry[key] = sum(r[key] ** 2 for r in sel) ** 0.5 / total
        out.append(entry)
    return out


def markdown(meta: dict, summary: list[dict], keys: list[str]) -> str:
    head = " | ".join(f"LoftQ r={k.split('_')[1][1:]} N={k.split('_')[2][2:]} (× NF4)" for k in keys)
    lines = [
        f"# LoftQ reconstruction error, {meta['model']} ({meta['date']})",
        "",
        f"`{meta['command']}`. Relative Frobenius error ‖W − Q̂‖/‖W‖ of every linear weight (output head "
        "excluded): plain NF4 (blocks of 64, no double quantization) against LoftQ's Q + s·B A (same NF4 "
        "quantizer, rank r, N alternations). Per projection: root of the summed squared errors over the root "
        "of the summed ‖W‖² of its 30 layers.",
        "",
        f"| projection | weights | plain NF4 | {head} |",
        "|---|---|---|" + "---|" * len(keys),
    ]
    for s in summary:
        cells = " | ".join(f"{s[k]:.5f} ({s[k] / s['nf4']:.3f})" for k in keys)
        lines.append(f"| {s['kind']} | {s['weights']} | {s['nf4']:.5f} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], keys: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / (len(keys) + 1)
    xs = range(len(summary))
    ax.bar([x - 0.4 + width / 2 for x in xs], [s["nf4"] for s in summary], width, label="plain NF4")
    for i, key in enumerate(keys):
        ax.bar([x - 0.4 + width * (i + 1.5) for x in xs], [s[key] for s in summary], width, label=key)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([s["kind"] for s in summary], fontsize=8)
    ax.set_ylabel("‖W − Q̂‖ / ‖W‖")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--out", default="benchmarks/results/loftq")
    args = parser.parse_args()
    torch.set_num_threads(1)  # many small factorisations: one thread is faster than a contended pool
    rows = measure(linear_weights(args.model), args.ranks, args.iters)
    keys = [f"loftq_r{r}_it{n}" for r in args.ranks for n in args.iters]
    summary = summarize(rows, keys)
    meta = {
        "model": args.model,
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/loftq_error.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(meta, summary, keys)
    _atomic(out / "loftq.json", json.dumps({**meta, "summary": summary, "rows": rows}, indent=1))
    _atomic(out / "loftq.md", text)
    plot(summary, keys, out / "loftq.png", f"NF4 vs LoftQ reconstruction error, {args.model}")
    print(text)


if __name__ == "__main__":
    main()
