"""Time one LoRA linear (forward, backward, total) for four providers side by side, into one CSV + plot.

Providers: (a) the frozen base linear, (b) HF PEFT's ``peft.tuners.lora.Linear``, (c) peftlab's fused
Triton kernel (CUDA only), (d) peftlab's torch path. Shapes are those of 135M to 8B models.

    python benchmarks/kernels/lora_linear.py [--out benchmarks/results/kernels] [--dtype bf16] [--quick]

On a CPU only (a), (b) and (d) run, in fp32. The CSV records the device and date of the run.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
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


def providers(d_in, d_out, r, dtype, device):
    import peft

    from peftlab.methods.lora import LoraLinear

    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype).requires_grad_(False)
    ours = LoraLinear(base, "d", r, 2 * r, 2.0, use_kernel="torch").to(device)
    holder = nn.Module()
    holder.lin = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
    hf = peft.get_peft_model(
        holder, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"])
    ).base_model.model.lin
    out = {"base": base, "hf-peft": hf, "peftlab-torch": ours}
    if device == "cuda":
        from peftlab.kernels import triton_available

        if triton_available():
            fused = LoraLinear(base, "d", r, 2 * r, 2.0, use_kernel="triton").to(device)
            out["peftlab-triton"] = fused
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


def bench(shape, dtype, device, repeats):
    tokens, d_in, d_out, r = shape
    rows = []
    for name, layer in providers(d_in, d_out, r, dtype, device).items():
        x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, d_out, device=device, dtype=dtype)
        for _ in range(3):  # warm-up (and Triton autotuning)
            layer(x).backward(grad)
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
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/kernels")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = (
        {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        if device == "cuda"
        else torch.float32
    )
    shapes = SHAPES if device == "cuda" else CPU_SHAPES
    device_name = (
        torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    stamp = datetime.date.today().isoformat()
    rows = []
    for shape in shapes:
        for row in bench(shape, dtype, device, args.repeats if device == "cuda" else 5):
            row.update(device=device_name, date=stamp)
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if device == "cuda" else "cpu"
    with open(out / f"lora_linear_{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / f"lora_linear_{tag}.png", f"LoRA linear fwd+bwd, {device_name}, {stamp}")
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
