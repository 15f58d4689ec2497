"""Where a LoRA linear's fwd+bwd time goes on a GPU: torch.profiler tables per provider and shape.

For each shape and provider of ``lora_linear.py`` (base, HF PEFT, peftlab torch / Triton), three
warm-up steps, then five profiled steps; writes the per-kernel CUDA-time table (top rows) and the
host (CPU) time of the step into one markdown file, so a kernel that trails cuBLAS, a dtype copy or a
launch-bound step shows by name.

    python benchmarks/kernels/profile_lora_linear.py --out DIR [--dtype bf16]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_linear import providers  # noqa: E402

SHAPES = [(8192, 4096, 4096, 16), (2048, 576, 1536, 16)]


def profile(layer, x, grad, steps: int = 5) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        layer(x).backward(grad)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            layer(x).backward(grad)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_lora_linear.py needs a CUDA device")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# LoRA linear profile, {torch.cuda.get_device_name()}, {args.dtype}, {datetime.date.today()}", ""]
    for tokens, d_in, d_out, r in SHAPES:
        for name, layer in providers(d_in, d_out, r, dtype, "cuda").items():
            x = torch.randn(tokens, d_in, device="cuda", dtype=dtype, requires_grad=True)
            grad = torch.randn(tokens, d_out, device="cuda", dtype=dtype)
            lines += [f"## {name}, {tokens}x{d_in}->{d_out}, r={r} (5 steps fwd+bwd)", "", "```",
                      profile(layer, x, grad), "```", ""]
            print(lines[-4].splitlines()[-1] if lines[-4] else "", flush=True)
    (out / "profile.md").write_text("\n".join(lines))
    print(f"wrote {out / 'profile.md'}")


if __name__ == "__main__":
    main()
