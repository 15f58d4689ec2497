"""Tables and plot of ``benchmarks/efficiency.py``: per-round ratios, medians over rounds, markdown, PNG.

``summarize`` turns the worker rows (one per configuration and round, plus the untimed exact-allocator
rows) into one summary per (model, configuration); ``markdown`` and ``plot`` render it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

#: glibc serves allocations from this size up by their own mmap in the exact-memory pass (MALLOC_MMAP_THRESHOLD_)
EXACT_MMAP_THRESHOLD = 1 << 20


def spread(values: list[float]) -> tuple[float, float, float] | None:
    return (statistics.median(values), min(values), max(values)) if values else None


def summarize(rows: list[dict], models: list[str], configs: list[str], memory_key: str) -> list[dict]:
    """Per (model, config): median step over rounds and per-round ratios to HF PEFT and floor-r0."""
    out = []
    for model_name in models:
        by_round: dict[int, dict[str, dict]] = {}
        exact = {r["config"]: r["peak_rss_mb"] for r in rows if r.get("pass") == "exact" and r["model"] == model_name}
        for row in rows:
            if row["model"] == model_name and "error" not in row and row.get("pass") != "exact":
                by_round.setdefault(row["round"], {})[row["config"]] = row
        for config in configs:
            runs = [r[config] for r in by_round.values() if config in r]
            errors = [r for r in rows if r["model"] == model_name and r["config"] == config and "error" in r]
            if not runs:
                if errors:
                    out.append({"model": model_name, "config": config, "error": errors[0]["error"]})
                continue
            summary = {
                "model": model_name,
                "config": config,
                "rounds": len(runs),
                "failed_rounds": len(errors),
                "step_s": spread([r["median_step_s"] for r in runs]),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                "memory_mb": statistics.median(r[memory_key] for r in runs if r.get(memory_key) is not None)
                if any(r.get(memory_key) is not None for r in runs) else None,
                "train_peak_rss_mb": statistics.median(r["train_peak_rss_mb"] for r in runs)
                if all(r.get("train_peak_rss_mb") is not None for r in runs) else None,
                "last_loss": runs[-1]["last_loss"],
                "exact_memory_mb": exact.get(config),
                "exact_memory_vs_hf": exact[config] / exact["hf-peft-lora"]
                if config in exact and exact.get("hf-peft-lora") else None,
                "exact_memory_vs_lora": exact[config] / exact["peftlab-lora"]
                if config in exact and exact.get("peftlab-lora") else None,
            }  # fmt: skip
            for ref in ("hf-peft-lora", "floor-r0", "peftlab-lora"):
                pairs, summary[f"time_vs_{ref}"], summary[f"memory_vs_{ref}"] = _paired(by_round, config, ref, memory_key)
                if pairs and ref == "hf-peft-lora" and config.startswith("peftlab-lora"):
                    summary["loss_rel_diff_vs_hf"] = _loss_rel_diff(*pairs[-1])
            peer = peer_of(config)
            pairs, summary["time_vs_peer"], summary["memory_vs_peer"] = _paired(by_round, config, peer, memory_key)
            summary["peer"] = peer if pairs else None
            if pairs:
                summary["loss_rel_diff_vs_peer"] = _loss_rel_diff(*pairs[-1])
            out.append(summary)
    return out


def _paired(by_round: dict, config: str, ref: str | None, memory_key: str) -> tuple[list, tuple | None, tuple | None]:
    """(config, ref) rows of the rounds that ran both, and the spreads of their time and memory ratios."""
    pairs = [(r[config], r[ref]) for r in by_round.values() if ref and config in r and ref in r]
    time = spread([a["median_step_s"] / b["median_step_s"] for a, b in pairs])
    memory = spread([a[memory_key] / b[memory_key] for a, b in pairs if a.get(memory_key) and b.get(memory_key)])
    return pairs, time, memory


def _loss_rel_diff(a: dict, b: dict) -> float:
    return abs(a["last_loss"] - b["last_loss"]) / abs(b["last_loss"])


def peer_of(config: str) -> str | None:
    """The HF PEFT row a peftlab row is compared with: ``peftlab-qlora`` -> ``hf-peft-qlora`` (same method,
    same recipe); LoRA variants of ours that the peer lacks (``-sac``, ``-ckpt``) have none."""
    if not config.startswith("peftlab-"):
        return None
    return "hf-peft-" + config.removeprefix("peftlab-")


def _fmt_spread(value, digits=2) -> str:
    if not value:
        return "–"
    med, lo, hi = value
    return f"{med:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


def _num(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if row.get(key) is not None else "–"


def markdown(meta: dict, summary: list[dict], rounds: list[dict], memory_label: str) -> str:
    lines = [
        f"# Training-step efficiency ({meta['device']}, {meta['date']})",
        "",
        f"`{meta['command']}`: {meta['rounds']} interleaved rounds (every configuration in its own process, "
        f"once per round), {meta['steps']} AdamW steps (lr 1e-4) on one fixed batch after a warm-up step, "
        "median step per process; LoRA r=16 on all linear layers, dropout off, LoRA A identical in peftlab "
        "and HF PEFT (so the last loss compares whole trajectories). Step: median over rounds [min–max]. "
        "Ratios are taken within each round (same machine load), then median [min–max] over rounds. "
        "`floor-r0`: peftlab's LoRA path with rank 0 (same autograd functions minus the LoRA term): the bound "
        "any adapter step here must pay; `floor-torch`: frozen plain nn.Linear model, input-gradient backward. "
        "Exact-allocator peak RSS (CPU): one more untimed step per configuration in a process where glibc "
        f"serves every block ≥ {EXACT_MMAP_THRESHOLD >> 20} MiB by its own mmap, so freed blocks leave the RSS at "
        "once: the peak of live tensors plus the touched weight pages, without glibc's heap retention (which "
        "makes the plain peak RSS depend on allocation order).",
        "",
        f"| model | config | step s | tokens/s | × floor-r0 time | × HF PEFT time | {memory_label} | "
        "× HF PEFT memory | exact-allocator peak RSS MB | × HF PEFT (exact) | × our LoRA (exact) | last loss | "
        "rel. diff vs HF PEFT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        if "error" in s:
            first = s["error"].strip().splitlines()[-1][:120] if s["error"].strip() else "failed"
            lines.append(f"| {s['model']} | {s['config']} | failed: {first} |" + "  |" * 10)
            continue
        diff = f"{s['loss_rel_diff_vs_hf']:.1e}" if "loss_rel_diff_vs_hf" in s else "–"
        mem = f"{s['memory_mb']:.0f}" if s["memory_mb"] is not None else "–"
        lines.append(
            f"| {s['model']} | {s['config']} | {_fmt_spread(s['step_s'], 3)} | {s['tokens_per_s']:.0f} | "
            f"{_fmt_spread(s['time_vs_floor-r0'])} | {_fmt_spread(s['time_vs_hf-peft-lora'])} | {mem} | "
            f"{_fmt_spread(s['memory_vs_hf-peft-lora'])} | {_num(s, 'exact_memory_mb', '.0f')} | "
            f"{_num(s, 'exact_memory_vs_hf', '.2f')} | {_num(s, 'exact_memory_vs_lora', '.2f')} | {s['last_loss']:.6f} | {diff} |"
        )
    peers = [s for s in summary if s.get("peer")]
    if peers:
        lines += ["", "Each peftlab row against the same method in HF PEFT (same recipe, same LoRA A, same rounds):",
                  "", f"| model | peftlab | HF PEFT | × time | × {memory_label} | last-loss rel. diff |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for s in peers:
            lines.append(
                f"| {s['model']} | {s['config']} | {s['peer']} | {_fmt_spread(s['time_vs_peer'])} | "
                f"{_fmt_spread(s['memory_vs_peer'])} | {s['loss_rel_diff_vs_peer']:.1e} |"
            )
    lines += ["", "Machine load (1-minute load average) per round:", "", "| round | started | load at start | load at end |",
              "|---|---|---|---|"]  # fmt: skip
    for r in rounds:
        lines.append(
            f"| {r['round']} | {r['started']} | {r['load_avg_start'][0]:.2f} | {r['load_avg_end'][0]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summary if "error" not in s and s.get("time_vs_floor-r0")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4))
    labels = [f"{s['model']}\n{s['config']}" for s in rows]
    med = [s["time_vs_floor-r0"][0] for s in rows]
    err = [
        [m - s["time_vs_floor-r0"][1] for m, s in zip(med, rows)],
        [s["time_vs_floor-r0"][2] - m for m, s in zip(med, rows)],
    ]
    ax.bar(range(len(rows)), med, yerr=err, capsize=3)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("step time / floor-r0 (median, min–max over rounds)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
