"""Time one LoRA linear (forward, backward, total) for four providers side by side, into one CSV + plot.

Providers: (a) the frozen base linear, (b) HF PEFT's ``peft.tuners.lora.Linear``, (c) peftlab's fused
Triton kernel (CUDA only), (d) peftlab's torch path. Shapes are those of 135M to 8B models.

    python benchmarks/kernels/lora_linear.py [--out benchmarks/results/kernels] [--dtype bf16] [--dry-run]

On a CPU only (a), (b) and (d) run, in fp32. The CSV records the device and date of the run; the .md
beside it gives, per shape, fused / frozen base (target ≤ 1.05) and HF PEFT / fused (target ≥ 1.25).
``--dry-run`` times one toy shape on the CPU, the fused kernel in Triton's interpreter.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

SHAPES = [  # (tokens, d_in, d_out, r): SmolLM2-135M, Llama-3.2-1B, Llama-3-8B (attention and MLP)
    (2048, 576, 576, 16),
    (2048, 576, 1536, 16),
    (8192, 2048, 2048, 16),
    (8192, 2048, 8192, 16),
    (8192, 4096, 4096, 16),
    (8192, 4096, 14336, 16),
]
CPU_SHAPES = [(512, 576, 576, 16), (512, 576, 1536, 16), (1024, 1024, 1024, 16)]
DRY_SHAPES = [(64, 32, 48, 16)]


class _Fused(nn.Module):
    """The fused kernel called directly (the dry run's stand-in for ``use_kernel="triton"`` on a CPU,
    where the layer refuses it; the kernel itself runs in Triton's interpreter)."""

    def __init__(self, layer, kernel_backward: bool = False):
        super().__init__()
        self.layer = layer
        self.kernel_backward = kernel_backward

    def forward(self, x):
        from peftlab.kernels import lora_linear

        params = dict(self.layer.named_parameters())
        a = next(v for k, v in params.items() if "lora_A" in k)
        b = next(v for k, v in params.items() if "lora_B" in k)
        weight = next(v for k, v in params.items() if k.endswith("weight") and "lora" not in k)
        return lora_linear(x, weight, None, a, b, 2.0, kernel_backward=self.kernel_backward)


def _peftlab(d_in, d_out, r, dtype, device, use_kernel):
    import peftlab

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype))
    peftlab.wrap(holder, peftlab.LoraConfig(r=r, alpha=2 * r, target_modules=["0"], use_kernel=use_kernel))
    holder = holder.to(device)
    gen = torch.Generator().manual_seed(1)  # B ≠ 0 (same in every peftlab provider), so the LoRA term is checked
    for name, param in holder.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    return holder


def providers(d_in, d_out, r, dtype, device, interpret=False):
    import peft

    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    holder = nn.Module()
    holder.lin = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    hf = peft.get_peft_model(
        holder, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"])
    ).base_model.model.lin
    out = {"base": base, "hf-peft": hf, "peftlab-torch": _peftlab(d_in, d_out, r, dtype, device, "torch")}
    from peftlab.kernels import triton_available

    if device == "cuda" and triton_available():
        out["peftlab-triton"] = _peftlab(d_in, d_out, r, dtype, device, "triton")
        # the same forward with the Triton backward kernels (what a dropout > 0 step runs; before
        # 2026-11-26 every step): shows what the cuBLAS backward gains
        out["peftlab-triton-kernel-bwd"] = _Fused(_peftlab(d_in, d_out, r, dtype, device, "torch"), kernel_backward=True)
    elif interpret and triton_available():
        out["peftlab-triton"] = _Fused(_peftlab(d_in, d_out, r, dtype, device, "torch"))
    return out


def timed(fn, device, repeats):
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


def _step(layer, x, grad):
    layer(x).backward(grad)


def _output_and_grad(layer, x, grad):
    """The layer's output and its lora_A gradient for (x, grad), detached."""
    a = next(p for n, p in layer.named_parameters() if "lora_A" in n)
    a.grad = None
    y = layer(x)
    y.backward(grad)
    out = (y.detach(), a.grad.detach().clone())
    a.grad = None
    return out


def bench(shape, dtype, device, repeats, interpret=False):
    tokens, d_in, d_out, r = shape
    rows = []
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(tokens, d_in, generator=gen).to(device, dtype)
    grad = torch.randn(tokens, d_out, generator=gen).to(device, dtype)
    want = None  # peftlab-torch's output and lora_A gradient: every peftlab provider must agree with it
    for name, layer in providers(d_in, d_out, r, dtype, device, interpret).items():
        x = x0.clone().requires_grad_(True)
        for _ in range(3):  # warm-up (and Triton autotuning)
            layer(x).backward(grad)
        err = None
        if name.startswith("peftlab"):
            got = _output_and_grad(layer, x, grad)
            if want is None:
                want = got
            else:  # relative to the largest entry: bf16 rounding of the outputs is ~4e-3
                err = max(float((g.float() - w.float()).abs().max() / w.float().abs().max()) for g, w in zip(got, want))
        fwd = timed(functools.partial(layer, x), device, repeats)
        total = timed(functools.partial(_step, layer, x, grad), device, repeats)
        rows.append(
            {
                "provider": name,
                "tokens": tokens,
                "d_in": d_in,
                "d_out": d_out,
                "r": r,
                "dtype": str(dtype).removeprefix("torch."),
                "forward_ms": 1e3 * fwd,
                "backward_ms": 1e3 * (total - fwd),
                "total_ms": 1e3 * total,
                "max_rel_err_vs_torch": err,
            }
        )
    return rows


def ratios_markdown(rows, title: str) -> str:
    """Per shape: fused / frozen base (target ≤ 1.05) and HF PEFT / fused (target ≥ 1.25), fwd+bwd."""
    lines = [f"# {title}", "", "| tokens | d_in | d_out | r | base ms | peftlab-triton ms | peftlab-torch ms | "
             "HF PEFT ms | triton, kernel bwd ms | triton / base (≤ 1.05) | HF PEFT / triton (≥ 1.25) | triton vs torch: max rel err (y, dA) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    shapes = list(dict.fromkeys((r["tokens"], r["d_in"], r["d_out"], r["r"]) for r in rows))
    for shape in shapes:
        got = {
            r["provider"]: r["total_ms"]
            for r in rows
            if (r["tokens"], r["d_in"], r["d_out"], r["r"]) == shape
        }
        tri = got.get("peftlab-triton")
        errs = [r["max_rel_err_vs_torch"] for r in rows if r["provider"] == "peftlab-triton"
                and (r["tokens"], r["d_in"], r["d_out"], r["r"]) == shape and r.get("max_rel_err_vs_torch") is not None]

        def fmt(v):
            return f"{v:.3f}" if v is not None else "–"

        lines.append(
            f"| {' | '.join(map(str, shape))} | {fmt(got.get('base'))} | {fmt(tri)} | {fmt(got.get('peftlab-torch'))} | "
            f"{fmt(got.get('hf-peft'))} | {fmt(got.get('peftlab-triton-kernel-bwd'))} | {fmt(tri / got['base'] if tri and got.get('base') else None)} | "
            f"{fmt(got['hf-peft'] / tri if tri and got.get('hf-peft') else None)} | "
            f"{f'{errs[0]:.1e}' if errs else '–'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/kernels")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--dry-run", action="store_true",
        help="one toy shape on the CPU, the fused kernel in Triton's interpreter (TRITON_INTERPRET=1)",
    )  # fmt: skip
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    dtype = (
        {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        if device == "cuda"
        else torch.float32
    )
    shapes = DRY_SHAPES if args.dry_run else SHAPES if device == "cuda" else CPU_SHAPES
    repeats = 2 if args.dry_run else args.repeats if device == "cuda" else 5
    device_name = (
        torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    stamp = datetime.date.today().isoformat()
    interpret = args.dry_run and os.environ.get("TRITON_INTERPRET") == "1"
    rows = []
    for shape in shapes:
        for row in bench(shape, dtype, device, repeats, interpret):
            row.update(device=device_name, date=stamp)
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "dry-run" if args.dry_run else "cuda" if device == "cuda" else "cpu"
    with open(out / f"lora_linear_{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    title = f"LoRA linear fwd+bwd, {device_name}, {str(dtype).removeprefix('torch.')}, {stamp}"
    (out / f"lora_linear_{tag}.md").write_text(ratios_markdown(rows, title))
    plot(rows, out / f"lora_linear_{tag}.png", title)
    print(ratios_markdown(rows, title))
    print(f"wrote {out / f'lora_linear_{tag}.csv'}")


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["tokens"], r["d_in"], r["d_out"], r["r"]) for r in rows})
    names = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(shapes) + 3, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [
            next(
                (
                    r["total_ms"]
                    for r in rows
                    if r["provider"] == name and (r["tokens"], r["d_in"], r["d_out"], r["r"]) == s
                ),
                0,
            )
            for s in shapes
        ]
        ax.bar([j + i * width for j in range(len(shapes))], values, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"{t}x{a}->{b}\nr={r}" for t, a, b, r in shapes], fontsize=8)
    ax.set_ylabel("forward + backward (ms)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
