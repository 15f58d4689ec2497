"""Time DoRA's weight norm n = ‖W + s·B A‖_row: the fused Triton kernel vs the unfused torch paths, per layer shape.

Providers (peftlab.kernels.dora_norm; W (N, K) in bf16 on CUDA, A (r, K) and B (N, r) fp32, s = 2):

* ``triton-fused``: one pass over W (‖W‖²_row and W·Aᵀ together), the Gram and B's terms in the epilogue;
* ``torch-thin``: the same equation in torch ops (peftlab's DoRA today, ``methods.dora.lora_row_norm``):
  ‖W‖²_row, then W·Aᵀ, A·Aᵀ, an addmm and a row sum: W is read twice;
* ``torch-thin-cached``: the same with ‖W‖²_row cached (what peftlab's DoRA slot does between steps):
  W read once, by the GEMM;
* ``hf-peft-dense``: ‖W + s·B A‖ formed densely in W's dtype (HF PEFT's ``get_weight_norm``).

Every provider's n is compared with the fp64 reference (max |n − ref| / max ref); the table gives each
one's median time (CUDA-synchronised, ``--repeats``), the fused kernel's effective bandwidth (W's bytes /
time), and per model the sum over one step's DoRA layers (every projection of every decoder layer).

    python benchmarks/kernels/dora_norm.py [--out benchmarks/results/kernels] [--repeats 50] [--dry-run]

``--dry-run``: one toy shape on the CPU, the kernel in Triton's interpreter (``TRITON_INTERPRET=1``).
Writes ``dora_norm_<cuda|dry-run>.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

#: (N = d_out, K = d_in) of every DoRA projection, per model, with how many of each a decoder layer has
MODELS = {
    "llama-3.1-8b": {"layers": 32, "shapes": {(4096, 4096): 2, (1024, 4096): 2, (14336, 4096): 2, (4096, 14336): 1}},
    "llama-3.2-1b": {"layers": 16, "shapes": {(2048, 2048): 2, (512, 2048): 2, (8192, 2048): 2, (2048, 8192): 1}},
}
RANKS = (16, 64)
DRY_SHAPES = [(48, 40, 16)]


def providers():
    from peftlab.kernels import dora_norm as D

    def hf_dense(w, a, b, s):
        lora = (b.to(w.dtype) @ a.to(w.dtype)) * s
        return torch.linalg.vector_norm(w + lora, dim=1).float()

    return {
        "triton-fused": lambda w, a, b, s, wsq: D.dora_row_norm(w, a, b, s, use_kernel="triton"),
        "torch-thin": lambda w, a, b, s, wsq: D.torch_row_norm(w, a, b, s),
        "torch-thin-cached": lambda w, a, b, s, wsq: D.torch_row_norm(w, a, b, s, weight_norm_sq=wsq),
        "hf-peft-dense": lambda w, a, b, s, wsq: hf_dense(w, a, b, s),
    }


def timed(fn, device: str, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(N: int, K: int, r: int, dtype, device: str, repeats: int) -> list[dict]:
    from peftlab.kernels import dora_norm as D

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(N, K, generator=gen) / K**0.5).to(device, dtype)
    a = (torch.randn(r, K, generator=gen) / K**0.5).to(device)
    b = (torch.randn(N, r, generator=gen) / r**0.5).to(device)
    s = 2.0
    ref = D.reference_dense(w.double(), a.double(), b.double(), s)
    wsq = D.torch_row_norm(w, a, b, s, return_wsq=True)[1]
    rows = []
    for name, fn in providers().items():
        try:
            err = float((fn(w, a, b, s, wsq).double() - ref).abs().max() / ref.abs().max())
            ms = 1e3 * timed(lambda fn=fn: fn(w, a, b, s, wsq), device, repeats)
        except Exception as exc:  # noqa: BLE001 - a provider that fails is a row that says so
            rows.append({"provider": name, "N": N, "K": K, "r": r, "ms": None, "gb_s": None, "max_rel_err": None,
                         "error": f"{type(exc).__name__}: {exc}"[:200]})  # fmt: skip
            continue
        rows.append({"provider": name, "N": N, "K": K, "r": r, "ms": ms, "gb_s": N * K * w.element_size() / (ms * 1e6),
                     "max_rel_err": err, "error": ""})  # fmt: skip
    return rows


def markdown(rows: list[dict], title: str, dry: bool) -> str:
    names = list(dict.fromkeys(r["provider"] for r in rows))
    lines = [f"# {title}", "", "Median ms per call (max rel. error vs fp64); fused GB/s = W's bytes / time.", "",
             "| N × K | r | " + " | ".join(names) + " | fused GB/s | torch-thin / fused | hf-peft-dense / fused |",
             "|---|---|" + "---:|" * (len(names) + 3)]  # fmt: skip
    shapes = list(dict.fromkeys((r["N"], r["K"], r["r"]) for r in rows))
    get = {(r["provider"], r["N"], r["K"], r["r"]): r for r in rows}

    def cell(row):
        if row is None or row["ms"] is None:
            return "failed" if row else "–"
        return f"{row['ms']:.4f} ({row['max_rel_err']:.1e})"

    for N, K, r in shapes:
        fused = get.get(("triton-fused", N, K, r))
        f_ms = fused["ms"] if fused else None

        def ratio(name, key=(N, K, r), f_ms=f_ms):
            other = get.get((name, *key))
            return f"{other['ms'] / f_ms:.2f}" if f_ms and other and other["ms"] else "–"

        gb_s = f"{fused['gb_s']:.0f}" if fused and fused["gb_s"] else "–"
        cells = " | ".join(cell(get.get((n, N, K, r))) for n in names)
        lines.append(f"| {N} × {K} | {r} | {cells} | {gb_s} | {ratio('torch-thin')} | {ratio('hf-peft-dense')} |")
    if not dry:
        lines += ["", "## Per training step (every DoRA projection of every decoder layer, norm only)", "",
                  "| model | r | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]  # fmt: skip
        for model, spec in MODELS.items():
            for r in RANKS:
                cells = []
                for n in names:
                    parts = [get.get((n, N, K, r)) for (N, K) in spec["shapes"]]
                    if any(p is None or p["ms"] is None for p in parts):
                        cells.append("–")
                        continue
                    total = spec["layers"] * sum(c * p["ms"] for p, c in zip(parts, spec["shapes"].values()))
                    cells.append(f"{total:.2f} ms")
                lines.append(f"| {model} | {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/kernels")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        raise SystemExit("dora_norm.py: no CUDA device; use --dry-run on a CPU")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = DRY_SHAPES if args.dry_run else list(dict.fromkeys((N, K, r) for spec in MODELS.values()
                                                                 for (N, K) in spec["shapes"] for r in RANKS))  # fmt: skip
    repeats = 2 if args.dry_run else args.repeats
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    rows = []
    for N, K, r in shapes:
        for row in bench(N, K, r, dtype, device, repeats):
            row.update(device=name, date=datetime.date.today().isoformat(), dtype=str(dtype).removeprefix("torch."))
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "dry-run" if args.dry_run else "cuda"
    with open(out / f"dora_norm_{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = f"DoRA weight norm, {name}, {str(dtype).removeprefix('torch.')}, {datetime.date.today().isoformat()}"
    text = markdown(rows, title + (" (DRY RUN: no GPU numbers)" if args.dry_run else ""), args.dry_run)
    (out / f"dora_norm_{tag}.md").write_text(text)
    print(text)
    failed = [r for r in rows if r["error"]]
    if failed:
        raise SystemExit(f"{len(failed)} provider(s) failed: {[(r['provider'], r['error']) for r in failed]}")


if __name__ == "__main__":
    main()
