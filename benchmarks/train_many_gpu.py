r"""GPU (issue 34): N LoRA jobs trained packed in one pass against one after another, on one frozen base.

One model (Llama-3.2-1B shapes, random weights, bf16) holds N LoRA adapters (ranks 8/16 alternating, all linear
layers). Every step trains every job on its own ``--batch`` rows of ``--seq`` random tokens, three ways:

* ``packed``: one forward + backward over the N·batch rows with ``adapter_names`` (per-row adapters: the Triton
  SGMV shrink/expand forward and the SGMV backward of :mod:`peftlab.kernels.sgmv_backward`);
* ``packed-torch``: the same, with the kernels off (the padded/gathered ``bmm`` path and autograd);
* ``sequential``: each job alone, one after another (its rows all run one adapter: the single-adapter path),
  as separate runs do, minus their model loads.

One AdamW over all adapters (a parameter group per job). Timed steps after warm-up, with
``torch.cuda.synchronize``; tokens/s = N·batch·seq·steps / seconds; peak = ``torch.cuda.max_memory_allocated``
per provider. The providers alternate within each round; ratios (packed / sequential tokens/s) are per round,
reported as median [min–max]. Before timing, one packed step's loss and adapter gradients through the kernels
are compared with the torch path's (the same computation; the relative difference is recorded).

    python benchmarks/train_many_gpu.py [--jobs 8] [--batch 4] [--seq 512] [--steps 10] [--rounds 2] [--out DIR]
    python benchmarks/train_many_gpu.py --dry-run [--out DIR]   # CPU, toy sizes, kernels in Triton's interpreter
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

#: meta-llama/Llama-3.2-1B's shapes (benchmarks/scale.py), and the dry run's toy stand-in.
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True}  # fmt: skip
TOY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
       "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "tie_word_embeddings": True}  # fmt: skip
PROVIDERS = ("packed", "packed-torch", "sequential")


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftlab

    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    with torch.device(args.device):
        model = LlamaForCausalLM(LlamaConfig(**(TOY if args.dry_run else LLAMA_1B))).to(dtype)
    names = [f"job{j}" for j in range(args.jobs)]
    for j, name in enumerate(names):
        r = 8 if j % 2 == 0 else 16
        targets = ["q_proj", "down_proj"] if args.dry_run else "all-linear"  # the interpreter is slow: two layers
        peftlab.wrap(model, peftlab.LoraConfig(r=r, alpha=2 * r, target_modules=targets, adapter_name=name))
    for n, p in model.named_parameters():  # B starts at zero: random B so that every gradient is non-trivial
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    peftlab.set_trainable(model, names)
    model.train()
    groups = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(f".{name}")],
               "lr": 1e-4 * (1 + j % 4)} for j, name in enumerate(names)]  # fmt: skip
    assert all(g["params"] for g in groups), "every job has trainable parameters"
    opt = torch.optim.AdamW(groups)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.jobs * args.batch, args.seq), generator=g).to(args.device)
    return model, opt, names, ids


def lm_loss(logits, ids, jobs: int):
    """Σ over jobs of each job's mean next-token loss (all jobs have as many tokens: N × the overall mean)."""
    import torch.nn.functional as F

    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(flat, ids[:, 1:].reshape(-1)) * jobs


def set_kernels(model, on: bool, force: bool) -> None:
    """Kernels on (the router decides: CUDA + Triton; ``force``: also on CPU tensors, in the interpreter) or off."""
    from peftlab.serving import router

    for module in model.modules():  # each layer caches its plan (kernels or not) per router
        module.__dict__.pop(router.LAYER_PLAN_ATTR, None)
    if not hasattr(router, "_use_triton_default"):
        router._use_triton_default = router._use_triton
    router._use_triton = (lambda layer, x: True) if (on and force) else router._use_triton_default if on else (
        lambda layer, x: False)


def step(model, opt, names, ids, provider: str, args) -> float:
    """One training step of every job; returns the summed loss."""
    set_kernels(model, provider != "packed-torch", force=args.dry_run)
    if provider == "sequential":
        total = 0.0
        for j, name in enumerate(names):
            rows = ids[j * args.batch : (j + 1) * args.batch]
            loss = lm_loss(model(input_ids=rows, adapter_names=[name] * args.batch).logits, rows, 1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += loss.item()
        return total
    row_names = [name for name in names for _ in range(args.batch)]
    loss = lm_loss(model(input_ids=ids, adapter_names=row_names).logits, ids, len(names))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def agreement(model, names, ids, args) -> dict:
    """One packed forward + backward through the kernels and through torch: loss and gradient differences."""
    out = {}
    for provider in ("packed", "packed-torch"):
        set_kernels(model, provider == "packed", force=args.dry_run)
        model.zero_grad(set_to_none=True)
        row_names = [name for name in names for _ in range(args.batch)]
        loss = lm_loss(model(input_ids=ids, adapter_names=row_names).logits, ids, len(names))
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        out[provider] = (loss.item(), grads)
    model.zero_grad(set_to_none=True)
    (lk, gk), (lt, gt) = out["packed"], out["packed-torch"]
    rel = max(((gk[n] - gt[n]).norm() / gt[n].norm().clamp_min(1e-30)).item() for n in gt)
    from peftlab.serving import train_rows

    return {"loss_kernels": lk, "loss_torch": lt, "loss_rel_diff": abs(lk - lt) / max(abs(lt), 1e-30),
            "grad_max_rel_diff": rel, "grads_compared": len(gt), "kernel_failures": list(train_rows._KERNELS_FAILED),
            "same_params": sorted(gk) == sorted(gt)}  # fmt: skip


def timed(model, opt, names, ids, provider: str, args) -> dict:
    import torch

    cuda = args.device == "cuda"
    for _ in range(args.warmup):
        step(model, opt, names, ids, provider, args)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(model, opt, names, ids, provider, args)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens = len(names) * args.batch * args.seq * args.steps
    return {"provider": provider, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}  # fmt: skip


def spread(values) -> str:
    return f"{statistics.median(values):.3g} [{min(values):.3g}–{max(values):.3g}]"


def markdown(data: dict) -> str:
    a = data["args"]
    lines = [f"# Packed per-row LoRA training vs one after another ({data['device']}, {data['date']})", "",
             f"`python benchmarks/train_many_gpu.py{' --dry-run' if a['dry_run'] else ''}`: {a['jobs']} LoRA jobs "
             f"(ranks 8/16, {'q_proj, down_proj' if a['dry_run'] else 'all linear layers'}) on "
             f"{'a one-layer toy Llama' if a['dry_run'] else 'Llama-3.2-1B shapes'} "
             f"(random weights, {a['dtype']}), {a['batch']} rows × {a['seq']} tokens per job per step, {a['steps']} "
             f"timed steps after {a['warmup']} warm-up, {a['rounds']} round(s), providers alternating.", "",
             "| provider | tokens/s, median [min–max] | peak MB | vs sequential (per round) |", "|---|---:|---:|---:|"]  # fmt: skip
    rounds = data["rounds"]
    for provider in PROVIDERS:
        rows = [r[provider] for r in rounds]
        ratio = [r[provider]["tokens_per_s"] / r["sequential"]["tokens_per_s"] for r in rounds]
        peak = [row["peak_mb"] for row in rows if row["peak_mb"] is not None]
        lines.append(f"| {provider} | {spread([row['tokens_per_s'] for row in rows])} | "
                     f"{f'{max(peak):,.0f}' if peak else '–'} | {spread(ratio)}× |")  # fmt: skip
    ag = data["agreement"]
    lines += ["", f"Kernels vs torch on one packed step: loss relative difference {ag['loss_rel_diff']:.2e}, largest "
              f"relative gradient difference {ag['grad_max_rel_diff']:.2e} over {ag['grads_compared']} adapter "
              f"tensors; kernel failures: {len(ag['kernel_failures'])}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="rows per job per step")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, kernels in Triton's interpreter")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.jobs, args.batch, args.seq, args.steps, args.warmup, args.rounds = 2, 2, 8, 1, 0, 1
        args.dtype = "fp32"
    import torch

    args.device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("train_many_gpu.py: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(1)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    model, opt, names, ids = build(args)
    data = {"device": device, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "args": vars(args), "agreement": agreement(model, names, ids, args),
            "rounds": []}  # fmt: skip
    for _ in range(args.rounds):
        data["rounds"].append({p: timed(model, opt, names, ids, p, args) for p in PROVIDERS})
    out = Path(args.out or "benchmarks/results/train_many_gpu")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("train_many_gpu.json", json.dumps(data, indent=1)), ("train_many_gpu.md", markdown(data))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    print(markdown(data))
    ag = data["agreement"]
    ok = not ag["kernel_failures"] and ag["same_params"] and ag["grad_max_rel_diff"] < (1e-4 if args.dtype == "fp32" else 5e-2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
