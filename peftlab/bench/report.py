"""report.md (one table per task and model) and PNG plots from results.jsonl records."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path


def variant(record: dict) -> str:
    """A row name: the label plus the parameters that vary (e.g. ``lora r=8``)."""
    params = " ".join(
        f"{k}={v}" for k, v in sorted((record.get("params") or {}).items()) if not isinstance(v, (list, dict))
    )
    return f"{record['label']} {params}".strip()


def aggregate(records: list[dict]) -> dict[tuple, dict]:
    """Mean/std over seeds of every successful (task, model, variant)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("status") == "ok":
            groups[(r["task"], r["model"], variant(r))].append(r)
    rows = {}
    for key, runs in groups.items():
        metric = runs[0]["metric"]
        test = [r["test"][metric] * 100 for r in runs]
        dev = [r["dev"][metric] * 100 for r in runs]
        rows[key] = {
            "metric": metric,
            "test": statistics.fmean(test),
            "test_std": statistics.stdev(test) if len(test) > 1 else 0.0,
            "dev": statistics.fmean(dev),
            "seeds": len(runs),
            "trainable_pct": runs[0]["trainable_pct"],
            "trainable": runs[0]["trainable_params"],
            "peak_mb": statistics.fmean(r["peak_memory_mb"] for r in runs),
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in runs),
            "step_s": statistics.fmean(r["median_step_s"] for r in runs),
            "steps": runs[0]["steps"],
            "device": runs[0]["env"]["device"],
        }
    return rows


def write_report(records: list[dict], out_dir: str | Path, title: str = "peftlab benchmark") -> Path:
    out = Path(out_dir)
    rows = aggregate(records)
    lines = [f"# {title}", ""]
    devices = sorted({r["device"] for r in rows.values()})
    if devices:
        lines += [
            f"Device: {', '.join(devices)}. Test metric ± std over seeds; Δ and ratios are relative to full fine-tuning.",
            "",
        ]
    for task, model in sorted({(k[0], k[1]) for k in rows}):
        keys = sorted((k for k in rows if k[:2] == (task, model)), key=lambda k: -rows[k]["test"])
        full = next((rows[k] for k in keys if k[2].split()[0] == "full"), None)
        metric = rows[keys[0]]["metric"]
        lines += [f"## {task} — {model}", ""]
        lines += [
            f"| method | trainable % | test {metric} | Δ vs full (pt) | dev {metric} | peak MB | × full mem | tokens/s | × full speed | steps |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k in keys:
            r = rows[k]
            delta = f"{r['test'] - full['test']:+.2f}" if full else "–"
            mem = f"{r['peak_mb'] / full['peak_mb']:.2f}" if full else "–"
            speed = f"{r['tokens_per_s'] / full['tokens_per_s']:.2f}" if full else "–"
            lines.append(
                f"| {k[2]} | {r['trainable_pct']:.3f} | {r['test']:.2f} ± {r['test_std']:.2f} | {delta} | {r['dev']:.2f} | "
                f"{r['peak_mb']:.0f} | {mem} | {r['tokens_per_s']:.0f} | {speed} | {r['steps']} |"
            )
        lines.append("")
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        lines += ["## Failed runs", "", "| method | task | model | error |", "|---|---|---|---|"]
        for r in failed:
            error = str(r.get("error", "")).replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {variant(r)} | {r['task']} | {r['model']} | {error} |")
        lines.append("")
    plots = write_plots(rows, out)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_plots(rows: dict[tuple, dict], out: Path) -> list[Path]:
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(k[0], k[1]) for k in rows})
    paths = []
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for k in (k for k in rows if k[:2] == group):
            r = rows[k]
            ax.errorbar(r["trainable"], r["test"], yerr=r["test_std"], fmt="o", capsize=3)
            ax.annotate(
                k[2].split()[0],
                (r["trainable"], r["test"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(f"test {rows[next(k for k in rows if k[:2] == group)]['metric']} (%)")
        ax.set_title(f"{group[0]} — {group[1]}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "metric_vs_params.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    for field, label, name in (
        ("peak_mb", "peak memory (MB)", "peak_memory.png"),
        ("tokens_per_s", "train tokens/s", "throughput.png"),
    ):
        fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
        for ax, group in zip(axes[0], groups):
            keys = sorted(k for k in rows if k[:2] == group)
            ax.barh([k[2] for k in keys], [rows[k][field] for k in keys], color="tab:blue")
            ax.set_xlabel(label)
            ax.set_title(f"{group[0]} — {group[1]}")
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
