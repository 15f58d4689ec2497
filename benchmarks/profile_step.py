"""Where a LoRA training step's time goes, against the floor.

    python benchmarks/profile_step.py [--model smollm2-135m] [--configs floor-r0 peftlab-lora hf-peft-lora]
        [--steps 2] [--device cpu|cuda] [--dtype fp32|bf16] [--out benchmarks/results/profile]

Each configuration (built by ``benchmarks/efficiency.py``'s registered builders: same model, batch, rank,
loss) runs in its own process: one warm-up step, then ``--steps`` steps under ``torch.profiler`` with input
shapes recorded. Every operator's *self* time (so nested calls are not counted twice) is put in one bucket:

* ``base GEMM``: matrix products with no dimension equal to the LoRA rank (the frozen projections, the head);
* ``LoRA thin GEMM``: matrix products with a dimension equal to the rank r (x·Aᵀ, xa·Bᵀ, g·B, gb·A, dA, dB);
* ``attention``, ``loss`` (log-softmax, NLL, logsumexp, the chunked loss), ``optimizer`` (AdamW's step),
  ``custom Function (Python glue)`` (time inside our autograd Functions outside their aten ops), ``elementwise /
  other`` (norms, activations, copies, the autograd engine's own adds).

Writes ``profile.md`` / ``profile.json``: per-step milliseconds per bucket and per configuration, with the
difference to the first configuration (the floor). On CUDA the buckets hold *device* self time (GPU work),
read from the CPU-side operator that launched each kernel (the kernel events themselves are skipped: summing
both would count every kernel twice); a Triton kernel counts under the autograd Function that launched it. Two
more rows tell a host-bound step from a device-bound one: the host's self CPU time per step (Python,
dispatch, launches) and the synchronised wall time per step. Profiling adds its own overhead (a few % on short ops),
so compare buckets across rows of this table, not with ``efficiency.md``'s wall-clock steps.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

BUCKETS = (
    "base GEMM", "LoRA thin GEMM", "attention", "loss", "optimizer", "custom Function (Python glue)",
    "elementwise / other",
)  # fmt: skip
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::addmm_"}
ATTENTION = ("attention", "softmax", "_efficient", "_flash")
LOSS = ("log_softmax", "nll_loss", "cross_entropy", "crossentropy", "logsumexp")
OPTIMIZER = ("_foreach", "adam", "Optimizer")


def bucket(name: str, shapes: list, rank: int) -> str:
    """The bucket of one profiler event (its name and its input shapes)."""
    low = name.lower()
    if any(key in low for key in OPTIMIZER):
        return "optimizer"
    if any(key in low for key in LOSS):
        return "loss"
    if any(key in low for key in ATTENTION):
        return "attention"
    if not name.startswith("aten::") and (name.endswith("Function") or name.endswith("FunctionBackward")):
        return "custom Function (Python glue)"  # a custom autograd Function's own time, outside its aten ops
    if name in GEMM_OPS:
        dims = [d for shape in shapes if isinstance(shape, (list, tuple)) and len(shape) >= 2 for d in shape[-2:]]
        if name in ("aten::bmm", "aten::baddbmm") and all(len(s) >= 3 for s in shapes if s):
            return "attention"  # batched products here are attention's QKᵀ / PV
        return "LoRA thin GEMM" if rank in dims else "base GEMM"
    return "elementwise / other"


def _self_time_us(event, cuda: bool) -> float:
    if not cuda:
        return event.self_cpu_time_total
    for attr in ("self_device_time_total", "self_cuda_time_total"):  # the name changed in torch 2.x
        if hasattr(event, attr):
            return getattr(event, attr)
    return 0.0


def worker(model_name: str, config: str, steps: int, device: str = "cpu", dtype: str = "fp32") -> dict:
    """Profile ``steps`` training steps of one configuration; per-step self time (ms) per bucket (device time
    on CUDA), plus host self time and synchronised wall time per step."""
    import time

    import efficiency as eff
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    setup = eff.SETUPS[model_name]
    cuda = device == "cuda"
    opts = {"device": device, "dtype": eff.DTYPES[dtype], "lora_dropout": 0.0, "steps": steps}
    model = eff.CONFIGS[config]["build"](model_name, setup, opts)
    model.train()
    batch = eff.make_batch(model, setup, device)
    loss_fn = eff.make_loss_fn(model, config, setup, batch)

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None

    def step():
        loss = loss_fn()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall_ms = (time.perf_counter() - start) * 1000.0 / steps
    totals = dict.fromkeys(BUCKETS, 0.0)
    top: dict[str, float] = {}
    host_ms = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        if cuda and getattr(event, "device_type", DeviceType.CPU) != DeviceType.CPU:
            continue  # a kernel: its time is already its launching operator's self device time
        ms = _self_time_us(event, cuda) / 1000.0 / steps
        host_ms += event.self_cpu_time_total / 1000.0 / steps
        totals[bucket(event.key, event.input_shapes, eff.RANK)] += ms
        top[event.key] = top.get(event.key, 0.0) + ms
    return {
        "config": config,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "buckets_ms": totals,
        "total_ms": sum(totals.values()),
        "host_ms": host_ms,
        "wall_ms": wall_ms,
        "top_ops_ms": dict(sorted(top.items(), key=lambda kv: -kv[1])[:12]),
        "load_avg": os.getloadavg()[0],
    }


def markdown(model_name: str, rows: list[dict], command: str) -> str:
    floor = rows[0]
    head = "| bucket | " + " | ".join(r["config"] for r in rows) + " | " + " | ".join(
        f"{r['config']} − {floor['config']}" for r in rows[1:]
    ) + " |"
    device = floor.get("device", "cpu")
    kind = "self CPU time" if device == "cpu" else "self GPU (device) time"
    lines = [
        f"# Where the step's time goes ({model_name}, {device}, {datetime.date.today()})",
        "",
        f"`{command}`: {kind} per training step (ms) per bucket under `torch.profiler` (one warm-up step, "
        "then the profiled steps; module docstring for the buckets). Load average at the end of each run: "
        + ", ".join(f"{r['config']} {r['load_avg']:.2f}" for r in rows) + ".",
        "",
        head,
        "|---|" + "---:|" * (2 * len(rows) - 1),
    ]
    extra = ("host self CPU total", "wall per step (synchronised)") if device != "cpu" else ()
    keys = {"total": "total_ms", "host self CPU total": "host_ms", "wall per step (synchronised)": "wall_ms"}
    for name in (*BUCKETS, "total", *extra):
        vals = [r[keys[name]] if name in keys else r["buckets_ms"][name] for r in rows]
        diffs = [v - vals[0] for v in vals[1:]]
        lines.append(f"| {name} | " + " | ".join(f"{v:.0f}" for v in vals) + " | "
                     + " | ".join(f"{d:+.0f}" for d in diffs) + " |")  # fmt: skip
    lines += ["", "Largest operators (self ms per step):", ""]
    for r in rows:
        ops = ", ".join(f"`{k}` {v:.0f}" for k, v in list(r["top_ops_ms"].items())[:8])
        lines.append(f"- **{r['config']}**: {ops}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", nargs="+", default=["floor-r0", "peftlab-lora", "hf-peft-lora"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the base model")
    ap.add_argument("--out", default="benchmarks/results/profile")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.worker, args.steps, args.device, args.dtype)))
        return
    from tqdm import tqdm

    rows = []
    for config in tqdm(args.configs, desc="configs", file=sys.stderr):
        cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--worker", config,
               "--device", args.device, "--dtype", args.dtype]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/profile_step.py " + " ".join(sys.argv[1:])
    for name, text in (("profile.md", markdown(args.model, rows, command)), ("profile.json", json.dumps(rows, indent=1))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    print((out / "profile.md").read_text())


if __name__ == "__main__":
    main()
