"""report.md (tables with intervals per task and model) and PNG plots from results.jsonl records.

For every (task, model) the accuracy table gives, per row (method variant): the test metric's mean ±
std over seeds and, with ≥ 2 seeds, its 95% t interval; the Δ vs full fine-tuning with a 95% paired
bootstrap interval over the test examples (seeds resampled too, :mod:`peftlab.bench.stats`), marked
``✓`` when the interval excludes 0 (the data resolve the difference's sign); and a ``⚠ chance`` flag
for a run whose dev metric never rose above chance level (the majority class + 3 standard errors).
An efficiency table, the targets (``targets.yaml`` in the output folder, optional), and plots follow:
metric vs trainable parameters, Δ vs full with intervals, the dev metric vs step (learning curves,
one figure per task), peak memory and throughput.

``python -m peftlab.bench.report OUT_DIR [--title T]`` rewrites the report of a (partial) sweep.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from .stats import Interval, chance_threshold, paired_bootstrap, seed_interval, target_status

TRAIN_SHOWN_IF_VARYING = (
    "lr",
    "max_steps",
    "epochs",
    "train_limit",
    "batch_size",
    "warmup_ratio",
    "weight_decay",
)


def _fmt(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def variant(record: dict, varying_train: tuple[str, ...] = (), varying_lists: tuple[str, ...] = ()) -> str:
    """A row name: the label, its scalar parameters, and the list parameters / train settings that vary
    among the records of the same label (e.g. ``lora alpha=16 r=8 lr=0.001``)."""
    params = record.get("params") or {}
    parts = [
        f"{k}={_fmt(v)}"
        for k, v in sorted(params.items())
        if not isinstance(v, (list, dict)) or k in varying_lists
    ]
    train = record.get("train") or {}
    parts += [f"{k}={_fmt(train[k])}" for k in varying_train if k in train]
    return f"{record['label']} {' '.join(parts)}".strip()


def _varying(records: list[dict]) -> dict[tuple, tuple[tuple[str, ...], tuple[str, ...]]]:
    """Per (task, model, label): the train keys and list-valued params whose values differ among its records."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r.get("task"), r.get("model"), r.get("label"))].append(r)
    out = {}
    for key, runs in groups.items():
        train = tuple(
            k for k in TRAIN_SHOWN_IF_VARYING if len({repr((r.get("train") or {}).get(k)) for r in runs}) > 1
        )
        lists = {k for r in runs for k, v in (r.get("params") or {}).items() if isinstance(v, list)}
        lists = tuple(
            sorted(k for k in lists if len({repr((r.get("params") or {}).get(k)) for r in runs}) > 1)
        )
        out[key] = (train, lists)
    return out


MEMORY_NOTE = (
    "Memory: *peak* is measured (CPU: the run's process peak RSS, data and evaluation included; CUDA: "
    "`max_memory_allocated`). *estimate (tensors)* is `peftlab.estimate`'s total peak of live tensors for one "
    "training step at the run's batch size and max_length: weights, optimizer states, gradients, activations. "
    "*expected process* adds what a process holds beyond them, measured per device "
    "(`peftlab.estimator.process`: the runtime, and the allocator's slack, glibc malloc caching freed blocks); "
    "– where unmeasured (CUDA). Budget memory by the expected process peak; the tensor figure is what methods change."
)


def row_names(records: list[dict]) -> list[str]:
    """The row name of each record (aligned with ``records``)."""
    varying = _varying(records)
    return [variant(r, *varying[(r.get("task"), r.get("model"), r.get("label"))]) for r in records]


def never_left_chance(record: dict) -> bool:
    """True when no dev evaluation of the run rose above chance level (stats.chance_threshold)."""
    metric = record["metric"]
    chance = record.get("dev_chance", 0.5 if metric in ("accuracy", "exact_match") else 0.0)
    size = record.get("dev_size") or (record.get("train") or {}).get("dev_limit") or 300
    dev_values = [e["metric"] for e in record.get("evals") or []] + [record["dev"][metric]]
    return max(dev_values) <= chance_threshold(chance, size, metric)


def aggregate(records: list[dict]) -> dict[tuple, dict]:
    """Per successful (task, model, variant): test/dev means, seed interval, runs, efficiency means."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    ok = [r for r in records if r.get("status") == "ok"]
    for r, name in zip(ok, row_names(ok)):
        groups[(r["task"], r["model"], name)].append(r)
    rows = {}
    for key, runs in groups.items():
        runs = sorted(runs, key=lambda r: r.get("seed", 0))
        metric = runs[0]["metric"]
        test = [r["test"][metric] * 100 for r in runs]
        dev = [r["dev"][metric] * 100 for r in runs]
        interval = seed_interval(test)
        rows[key] = {
            "metric": metric,
            "label": runs[0]["label"],
            "runs": runs,
            "test": interval.mean,
            "test_std": interval.std,
            "interval": interval,
            "dev": statistics.fmean(dev),
            "seeds": len(runs),
            "chance_runs": sum(never_left_chance(r) for r in runs),
            "trainable_pct": runs[0]["trainable_pct"],
            "trainable": runs[0]["trainable_params"],
            "peak_mb": statistics.fmean(r["peak_memory_mb"] for r in runs),
            "estimate_mb": runs[0].get("estimate_mb"),
            "expected_mb": runs[0].get("expected_process_mb"),
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in runs),
            "step_s": statistics.fmean(r["median_step_s"] for r in runs),
            "steps": runs[0]["steps"],
            "device": runs[0]["env"]["device"],
        }
    return rows


def compare(a: dict, b: dict, n_boot: int = 2000) -> Interval | None:
    """Paired-bootstrap Δ (points) of row ``a`` minus row ``b``; None when the runs lack per-example data."""
    try:
        delta = paired_bootstrap(
            [r.get("test_examples") for r in a["runs"]],
            [r.get("test_examples") for r in b["runs"]],
            a["metric"],
            n_boot=n_boot,
        )
    except ValueError:
        return None
    return Interval(delta.mean * 100, delta.lo * 100, delta.hi * 100, delta.std * 100, delta.n)


def _reference(rows: dict[tuple, dict], keys: list[tuple], label: str = "full") -> tuple | None:
    return next((k for k in keys if rows[k]["label"] == label), None)


def _load_targets(out: Path) -> dict:
    """``targets.yaml`` in the output folder: ``{reference: label, targets: [...]}`` (both optional)."""
    path = out / "targets.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def targets_section(rows: dict[tuple, dict], targets: list[dict]) -> list[str]:
    """A table of targets ``{a, b, margin, text, [task], [equivalent]}`` (labels a and b; Δ = a - b ≥ -margin,
    or, with ``equivalent: true``, "not resolvably different")."""
    lines = [
        "## Targets",
        "",
        "Δ = first − second in points, 95% paired-bootstrap interval over test examples and seeds. "
        "**met**: the whole interval satisfies the target; **missed**: none of it does; "
        "**undecided**: the interval straddles the threshold. *On the mean*: the target read on the mean Δ alone "
        "(the targets are stated on the means of the seeds), ✓ or ✗ with the shortfall.",
        "",
        "| target | task | Δ (pt) | 95% interval | on the mean | status |",
        "|---|---|---|---|---|---|",
    ]
    for t in targets:
        for task, model in sorted({(k[0], k[1]) for k in rows}):
            if t.get("task") and t["task"] != task:
                continue
            keys = [k for k in rows if k[:2] == (task, model)]
            ka, kb = _reference(rows, keys, t["a"]), _reference(rows, keys, t["b"])
            if ka is None or kb is None:
                continue
            delta = compare(rows[ka], rows[kb])
            if delta is None:
                continue
            margin = float(t.get("margin", 0.0))
            if t.get("equivalent"):
                status = "missed" if delta.resolved else "met (not resolved)"
                on_mean = "–"
            else:
                on_mean = "✓" if delta.mean >= -margin else f"✗ by {-margin - delta.mean:.2f}"
                status = target_status(delta, margin)
                if status == "missed":
                    status += f" by {-margin - delta.mean:.2f} pt"
            lines.append(
                f"| {t.get('text', t['a'] + ' vs ' + t['b'])} | {task} | {delta.mean:+.2f} | "
                f"[{delta.lo:+.2f}, {delta.hi:+.2f}] | {on_mean} | {status} |"
            )
    return lines + [""]


def write_report(records: list[dict], out_dir: str | Path, title: str = "peftlab benchmark") -> Path:
    out = Path(out_dir)
    rows = aggregate(records)
    settings = _load_targets(out)
    reference = settings.get("reference", "full")
    lines = [f"# {title}", ""]
    devices = sorted({r["device"] for r in rows.values()})
    if devices:
        lines += [
            f"Device: {', '.join(devices)}. Test metric: mean ± std over seeds, with the 95% t interval of "
            f"the mean when there are ≥ 2 seeds. Δ vs {reference} in points with a 95% paired bootstrap "
            "interval over the test examples (seeds resampled too); ✓ marks a Δ whose interval excludes 0 "
            "(the data resolve it), – a Δ they do not. ⚠ chance: a run whose dev metric never rose above "
            "chance level (majority class + 3 standard errors): it did not train, read it as broken.",
            "",
        ]
    deltas: dict[tuple, Interval] = {}
    for task, model in sorted({(k[0], k[1]) for k in rows}):
        keys = sorted((k for k in rows if k[:2] == (task, model)), key=lambda k: -rows[k]["test"])
        ref_key = _reference(rows, keys, reference)
        full = rows[ref_key] if ref_key else None
        metric = rows[keys[0]]["metric"]
        lines += [f"## {task} — {model}", ""]
        lines += [
            f"| method | trainable % | seeds | test {metric} | 95% interval | Δ vs {reference} (pt) | Δ 95% interval | resolved | dev {metric} | steps |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k in keys:
            r = rows[k]
            iv = r["interval"]
            ci = f"[{iv.lo:.2f}, {iv.hi:.2f}]" if iv.n > 1 else "–"
            delta = compare(r, full) if full and k != ref_key else None
            if delta is not None:
                deltas[k] = delta
            d_point = f"{r['test'] - full['test']:+.2f}" if full and k != ref_key else "–"
            d_ci = f"[{delta.lo:+.2f}, {delta.hi:+.2f}]" if delta else "–"
            resolved = ("✓" if delta.resolved else "–") if delta else "–"
            flag = f" ⚠ chance ({r['chance_runs']}/{r['seeds']})" if r["chance_runs"] else ""
            lines.append(
                f"| {k[2]}{flag} | {r['trainable_pct']:.3f} | {r['seeds']} | {r['test']:.2f} ± {r['test_std']:.2f} | "
                f"{ci} | {d_point} | {d_ci} | {resolved} | {r['dev']:.2f} | {r['steps']} |"
            )
        lines += [
            "",
            f"| method | peak MB | estimate MB (tensors) | expected process MB | × {reference} mem | tokens/s | "
            f"× {reference} speed |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in keys:
            r = rows[k]
            mem = f"{r['peak_mb'] / full['peak_mb']:.2f}" if full else "–"
            speed = f"{r['tokens_per_s'] / full['tokens_per_s']:.2f}" if full else "–"
            est = f"{r['estimate_mb']:.0f}" if r.get("estimate_mb") is not None else "–"  # peftlab.estimate
            expected = f"{r['expected_mb']:.0f}" if r.get("expected_mb") is not None else "–"
            lines.append(
                f"| {k[2]} | {r['peak_mb']:.0f} | {est} | {expected} | {mem} | {r['tokens_per_s']:.0f} | {speed} |"
            )
        lines += ["", MEMORY_NOTE, ""]
    flagged = [k for k in rows if rows[k]["chance_runs"]]
    if flagged:
        lines += ["## Runs that never left chance level", ""]
        for k in flagged:
            r = rows[k]
            curve = ", ".join(
                f"{e['step']}: {100 * e['metric']:.1f}" for e in (r["runs"][0].get("evals") or [])
            )
            lines.append(
                f"- {k[2]} ({k[0]}, {k[1]}): {r['chance_runs']} of {r['seeds']} seed(s); dev {r['metric']} "
                f"by step (seed {r['runs'][0].get('seed')}): {curve or 'no evaluations'}. "
                "The method did not train in this budget: check its learning rate and schedule."
            )
        lines.append("")
    if settings.get("targets") and rows:
        lines += targets_section(rows, settings["targets"])
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        lines += ["## Failed runs", "", "| method | task | model | error |", "|---|---|---|---|"]
        for r in failed:
            error = str(r.get("error", "")).replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {variant(r)} | {r['task']} | {r['model']} | {error} |")
        lines.append("")
    plots = write_plots(rows, out, deltas, reference)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path


def plot_labels(rows: dict[tuple, dict]) -> dict[tuple, str]:
    """Per row: its label when no other row of the same (task, model) shares it, else the abbreviated name."""
    out = {}
    for k, r in rows.items():
        same = [j for j in rows if j[:2] == k[:2] and rows[j]["label"] == r["label"]]
        out[k] = r["label"] if len(same) == 1 else _short(k[2])
    return out


def _short(name: str) -> str:
    """A plot label: the label plus the settings after it, abbreviated."""
    return (
        name.replace("target_modules=", "")
        .replace("num_virtual_tokens=", "vt=")
        .replace("projection_dim=", "p=")
    )


def write_plots(
    rows: dict[tuple, dict], out: Path, deltas: dict[tuple, Interval] | None = None, reference: str = "full"
) -> list[Path]:
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(k[0], k[1]) for k in rows})
    names = plot_labels(rows)
    paths = []
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for k in (k for k in rows if k[:2] == group):
            r = rows[k]
            iv = r["interval"]
            yerr = [[r["test"] - iv.lo], [iv.hi - r["test"]]] if iv.n > 1 else None
            ax.errorbar(r["trainable"], r["test"], yerr=yerr, fmt="o", capsize=3)
            ax.annotate(
                r["label"], (r["trainable"], r["test"]), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(f"test {rows[next(k for k in rows if k[:2] == group)]['metric']} (%), 95% interval")
        ax.set_title(f"{group[0]} — {group[1]}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "metric_vs_params.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if deltas:
        paths.append(_delta_plot(plt, rows, deltas, groups, out, reference))
    for task in sorted({g[0] for g in groups}):
        paths.append(_learning_curves(plt, rows, task, out))
    for field, label, name in (
        ("peak_mb", "peak memory (MB)", "peak_memory.png"),
        ("tokens_per_s", "train tokens/s", "throughput.png"),
    ):
        fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
        for ax, group in zip(axes[0], groups):
            keys = sorted(k for k in rows if k[:2] == group)
            ax.barh([names[k] for k in keys], [rows[k][field] for k in keys], color="tab:blue")
            ax.set_xlabel(label)
            ax.set_title(f"{group[0]} — {group[1]}")
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _delta_plot(plt, rows, deltas, groups, out: Path, reference: str = "full") -> Path:
    """Δ vs the reference row with 95% intervals, one panel per (task, model)."""
    fig, axes = plt.subplots(
        1, len(groups), figsize=(7 * len(groups), 0.45 * max(len(deltas), 4) + 1.5), squeeze=False
    )
    for ax, group in zip(axes[0], groups):
        keys = sorted((k for k in deltas if k[:2] == group), key=lambda k: deltas[k].mean)
        for i, k in enumerate(keys):
            d = deltas[k]
            color = "tab:red" if d.hi < 0 else ("tab:green" if d.lo > 0 else "tab:gray")
            ax.errorbar(d.mean, i, xerr=[[d.mean - d.lo], [d.hi - d.mean]], fmt="o", color=color, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(keys)), [plot_labels(rows)[k] for k in keys], fontsize=8)
        ax.set_xlabel(f"Δ test metric vs {reference} (points), 95% paired bootstrap")
        ax.set_title(f"{group[0]} — {group[1]}")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path = out / f"delta_vs_{reference}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _learning_curves(plt, rows, task: str, out: Path) -> Path:
    """Dev metric vs step for every row of ``task`` (one panel per model): mean over seeds, band min..max."""
    models = sorted({k[1] for k in rows if k[0] == task})
    fig, axes = plt.subplots(1, len(models), figsize=(8 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models):
        keys = sorted(k for k in rows if k[:2] == (task, model))
        cmap = plt.get_cmap("tab20" if len(keys) > 10 else "tab10")
        for i, k in enumerate(keys):
            curves = [{e["step"]: 100 * e["metric"] for e in r.get("evals") or []} for r in rows[k]["runs"]]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            values = [[c[s] for c in curves] for s in steps]
            mean = [statistics.fmean(v) for v in values]
            ax.plot(steps, mean, marker="o", ms=3, color=cmap(i % cmap.N), label=plot_labels(rows)[k])
            if len(curves) > 1:
                ax.fill_between(
                    steps,
                    [min(v) for v in values],
                    [max(v) for v in values],
                    color=cmap(i % cmap.N),
                    alpha=0.15,
                )
        ax.set_xlabel("training step")
        ax.set_ylabel(f"dev {rows[keys[0]]['metric']} (%)")
        ax.set_title(f"{task} — {model}: dev metric vs step (band: min..max over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / f"learning_curves_{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="rewrite report.md and the plots of a sweep's results folder"
    )
    parser.add_argument("out", help="folder holding results.jsonl")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    from .runner import read_results

    records = read_results(args.out)
    if not records:
        raise SystemExit(f"no records in {Path(args.out) / 'results.jsonl'}")
    title = args.title or f"peftlab bench: {records[0].get('sweep', Path(args.out).name)}"
    print(write_report(records, args.out, title=title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
