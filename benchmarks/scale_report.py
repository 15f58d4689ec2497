r"""``benchmarks/scale.py``'s tables: rounds → ``scale.json`` (the issue-32 schema), its validation, ``scale.md``.

Schema (issue 32; every key exactly, nothing more)::

    {"device": str, "date": "YYYY-MM-DD", "commit": str,
     "train":  [{"model", "method": lora|qlora|dora|floor, "library": peftlab|hf-peft, "batch": int, "seq": int,
                 "settings": str, "tokens_per_s": float, "peak_mib": float, "loss_rel_diff": float | null}],
     "kernel": [{"shape": "TOKENSxD_INxD_OUT", "base_ms": float, "peftlab_ms": float, "hf_peft_ms": float}],
     "decode": [{"model", "adapters": int, "batch": int, "library": peftlab|hf-peft|base, "tokens_per_s": float}]}

Aggregation over rounds: median tokens/s and ms, max peak MiB, max ``loss_rel_diff`` (defined in scale.py).
"""

from __future__ import annotations

import math
import re
import statistics

TOP = ("device", "date", "commit", "train", "kernel", "decode")
TRAIN = {"model": str, "method": str, "library": str, "batch": int, "seq": int, "settings": str,
         "tokens_per_s": float, "peak_mib": float, "loss_rel_diff": float}  # fmt: skip
KERNEL = {"shape": str, "base_ms": float, "peftlab_ms": float, "hf_peft_ms": float}
DECODE = {"model": str, "adapters": int, "batch": int, "library": str, "tokens_per_s": float}
METHODS = ("floor", "lora", "dora", "qlora")
ENUMS = {"method": METHODS, "library": ("peftlab", "hf-peft")}
DECODE_LIBRARIES = ("base", "peftlab", "hf-peft")


def _rows(raw: dict, kind: str) -> list[dict]:
    return [r for p in raw["processes"] for r in p["rows"] if r.get("kind") == kind and "error" not in r]


def _loss_diff(row: dict, rows: list[dict]) -> float | None:
    """|loss − HF PEFT's| / |HF PEFT's| at the last step both took (floor: first step vs HF PEFT LoRA), same round."""
    if row["library"] == "hf-peft":
        return 0.0
    method = "lora" if row["method"] == "floor" else row["method"]
    peer = next((r for r in rows if r["library"] == "hf-peft" and r["model"] == row["model"] and r["method"] == method
                 and r["round"] == row["round"]), None)  # fmt: skip
    if peer is None:
        return None
    i = 0 if row["method"] == "floor" else min(len(row["losses"]), len(peer["losses"])) - 1
    ref = peer["losses"][i]
    return abs(row["losses"][i] - ref) / max(abs(ref), 1e-12)


def _order(values, key):
    return sorted(values, key=key)


def aggregate(raw: dict) -> dict:
    """scale.json's dict from the raw record (all rounds of all processes)."""
    train = _rows(raw, "train")
    groups: dict[tuple, list[dict]] = {}
    for r in train:
        groups.setdefault((r["model"], r["method"], r["library"]), []).append(r)
    models = list(dict.fromkeys(r["model"] for r in train))
    out_train = []
    for key in _order(groups, lambda k: (models.index(k[0]), METHODS.index(k[1]), k[2] != "peftlab")):
        rs = groups[key]
        # a non-finite loss (a diverged step) has no relative difference: null here, its losses stay in scale-raw.json
        diffs = [d for d in (_loss_diff(r, train) for r in rs) if d is not None and math.isfinite(d)]
        out_train.append({"model": key[0], "method": key[1], "library": key[2], "batch": int(rs[0]["batch"]),
                          "seq": int(rs[0]["seq"]), "settings": rs[0]["settings"],
                          "tokens_per_s": float(statistics.median(r["tokens_per_s"] for r in rs)),
                          "peak_mib": float(max(r["peak_mib"] for r in rs)),
                          "loss_rel_diff": float(max(diffs)) if diffs else None})  # fmt: skip
    kgroups: dict[str, list[dict]] = {}
    for r in _rows(raw, "kernel"):
        kgroups.setdefault(r["shape"], []).append(r)
    out_kernel = [{"shape": s, **{k: float(statistics.median(r[k] for r in rs)) for k in ("base_ms", "peftlab_ms", "hf_peft_ms")}}
                  for s, rs in kgroups.items()]  # fmt: skip
    dgroups: dict[tuple, list[dict]] = {}
    for r in _rows(raw, "decode"):
        dgroups.setdefault((r["model"], r["adapters"], r["batch"], r["library"]), []).append(r)
    out_decode = [{"model": k[0], "adapters": int(k[1]), "batch": int(k[2]), "library": k[3],
                   "tokens_per_s": float(statistics.median(r["tokens_per_s"] for r in rs))}
                  for k, rs in _order(dgroups.items(), lambda kv: (kv[0][0], kv[0][1], kv[0][2], DECODE_LIBRARIES.index(kv[0][3])))]  # fmt: skip
    return {"device": raw["device"], "date": raw["date"], "commit": raw["commit"],
            "train": out_train, "kernel": out_kernel, "decode": out_decode}  # fmt: skip


def _check_row(where: str, row: dict, fields: dict, problems: list[str], nullable=()) -> None:
    if set(row) != set(fields):
        problems.append(f"{where}: keys {sorted(row)} != {sorted(fields)}")
        return
    for name, kind in fields.items():
        value = row[name]
        if value is None and name in nullable:
            continue
        if kind is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                problems.append(f"{where}.{name}: {value!r} is not a finite number ≥ 0")
        elif kind is int:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{where}.{name}: {value!r} is not a positive integer")
        elif not isinstance(value, str) or not value:
            problems.append(f"{where}.{name}: {value!r} is not a non-empty string")


def validate(result: dict) -> list[str]:
    """Everything in ``result`` that breaks the schema (empty: valid)."""
    problems: list[str] = []
    if tuple(result) != TOP:
        problems.append(f"top-level keys {list(result)} != {list(TOP)}")
        return problems
    for key in ("device", "date", "commit"):
        if not isinstance(result[key], str) or not result[key]:
            problems.append(f"{key}: {result[key]!r} is not a non-empty string")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(result["date"])):
        problems.append(f"date {result['date']!r} is not YYYY-MM-DD")
    for i, row in enumerate(result["train"]):
        _check_row(f"train[{i}]", row, TRAIN, problems, nullable=("loss_rel_diff",))
        for name, allowed in ENUMS.items():
            if row.get(name) not in allowed:
                problems.append(f"train[{i}].{name}: {row.get(name)!r} not in {allowed}")
    for i, row in enumerate(result["kernel"]):
        _check_row(f"kernel[{i}]", row, KERNEL, problems)
        if not re.fullmatch(r"\d+x\d+x\d+", str(row.get("shape"))):
            problems.append(f"kernel[{i}].shape {row.get('shape')!r} is not TOKENSxD_INxD_OUT")
    for i, row in enumerate(result["decode"]):
        _check_row(f"decode[{i}]", row, DECODE, problems)
        if row.get("library") not in DECODE_LIBRARIES:
            problems.append(f"decode[{i}].library {row.get('library')!r} not in {DECODE_LIBRARIES}")
    return problems


# ---- scale.md ------------------------------------------------------------------------------------------


def _f(v, digits=3):
    if v is None:
        return "–"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"


def _ratio(a, b):
    return a / b if a is not None and b else None


def goals(result: dict) -> list[tuple[str, str, float | None, str]]:
    """(goal, target, figure, verdict) for every goal of issue 32 (figure None: not measured)."""
    train = {(r["model"], r["method"], r["library"]): r for r in result["train"]}
    kernel = {r["shape"]: r for r in result["kernel"]}
    decode = {(r["model"], r["library"]): r["tokens_per_s"] for r in result["decode"]}

    def tps(model, method, lib):
        return train.get((model, method, lib), {}).get("tokens_per_s")

    def mem(model, method, lib):
        return train.get((model, method, lib), {}).get("peak_mib")

    rows = []
    for model, method, t_goal, m_goal in (("llama-3.1-8b", "lora", 1.5, 0.6), ("llama-3.2-1b", "lora", 1.5, 0.6),
                                          ("llama-3.1-8b", "qlora", 1.3, 0.8), ("llama-3.1-8b", "dora", 1.5, None)):  # fmt: skip
        rows.append((f"{method} {model}: tokens/s vs HF PEFT", f"≥ {t_goal}", _ratio(tps(model, method, "peftlab"), tps(model, method, "hf-peft")), "ge", t_goal))
        if m_goal is not None:
            rows.append((f"{method} {model}: peak memory vs HF PEFT", f"≤ {m_goal}", _ratio(mem(model, method, "peftlab"), mem(model, method, "hf-peft")), "le", m_goal))
    rows.append(("dora llama-3.1-8b: step time vs our LoRA step", "≤ 1.15",
                 _ratio(tps("llama-3.1-8b", "lora", "peftlab"), tps("llama-3.1-8b", "dora", "peftlab")), "le", 1.15))
    k = kernel.get("8192x4096x4096", {})
    rows.append(("one LoRA linear 8192 × 4096 → 4096 fwd+bwd vs the frozen base", "≤ 1.15", _ratio(k.get("peftlab_ms"), k.get("base_ms")), "le", 1.15))
    rows.append(("decode 16 adapters / batch 32, 1B: vs the no-adapter model", "≥ 0.7",
                 _ratio(decode.get(("llama-3.2-1b", "peftlab")), decode.get(("llama-3.2-1b", "base"))), "ge", 0.7))
    rows.append(("decode 16 adapters / batch 32, 1B: vs HF PEFT adapter_names", "≥ 3",
                 _ratio(decode.get(("llama-3.2-1b", "peftlab")), decode.get(("llama-3.2-1b", "hf-peft"))), "ge", 3.0))
    out = []
    for name, target, figure, op, bound in rows:
        verdict = "not measured" if figure is None else ("met" if (figure >= bound if op == "ge" else figure <= bound) else "MISSED")
        out.append((name, target, figure, verdict))
    return out


def markdown(result: dict, raw: dict) -> str:
    dry = raw.get("dry_run")
    lines = [f"# GPU at scale (issue 32): {result['device']}, {result['date']}, commit {result['commit']}"
             + (" — DRY RUN (CPU, toy sizes: no GPU numbers)" if dry else ""), "",
             f"`{raw['command']}`; parts {', '.join(raw['parts'])}, {raw['rounds']} round(s), budget {raw['budget_s']:.0f} s"
             + (f", {raw['seconds']:.0f} s in all" if "seconds" in raw else "") + ". Random weights with the real configs, "
             "bf16, each library in its own process; medians over rounds (peak: max). Ratios are peftlab ÷ HF PEFT.", "",
             "## Train steps", "",
             "| model | method | library | batch × seq | tokens/s | peak MiB | tokens/s vs HF PEFT | memory vs HF PEFT | loss rel. diff | settings |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    train = {(r["model"], r["method"], r["library"]): r for r in result["train"]}
    for r in result["train"]:
        peer = train.get((r["model"], "lora" if r["method"] == "floor" else r["method"], "hf-peft"))
        show = r["library"] == "peftlab" and peer is not None
        lines.append(f"| {r['model']} | {r['method']} | {r['library']} | {r['batch']} × {r['seq']} | {_f(r['tokens_per_s'], 4)} | "
                     f"{_f(r['peak_mib'], 4)} | {_f(_ratio(r['tokens_per_s'], peer['tokens_per_s'])) if show else '–'} | "
                     f"{_f(_ratio(r['peak_mib'], peer['peak_mib'])) if show else '–'} | {_f(r['loss_rel_diff'], 2)} | {r['settings']} |")  # fmt: skip
    lines += ["", "Floor rows: no adapter (compared with HF PEFT LoRA). Loss rel. diff: see scale.py.", "",
              "## One LoRA linear, fwd + bwd (r = 16)", "",
              "| tokens × d_in × d_out | base ms | peftlab ms | HF PEFT ms | peftlab / base | HF PEFT / peftlab |",
              "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in result["kernel"]:
        lines.append(f"| {r['shape']} | {_f(r['base_ms'])} | {_f(r['peftlab_ms'])} | {_f(r['hf_peft_ms'])} | "
                     f"{_f(_ratio(r['peftlab_ms'], r['base_ms']))} | {_f(_ratio(r['hf_peft_ms'], r['peftlab_ms']))} |")  # fmt: skip
    lines += ["", "## Multi-adapter decode", "", "| model | adapters | batch | library | tokens/s | vs base |", "|---|---:|---:|---|---:|---:|"]
    base = {(r["model"], r["batch"]): r["tokens_per_s"] for r in result["decode"] if r["library"] == "base"}
    for r in result["decode"]:
        lines.append(f"| {r['model']} | {r['adapters']} | {r['batch']} | {r['library']} | {_f(r['tokens_per_s'], 4)} | "
                     f"{_f(_ratio(r['tokens_per_s'], base.get((r['model'], r['batch']))))} |")  # fmt: skip
    lines += ["", "## Goals", "", "| goal | target | figure | verdict |", "|---|---|---:|---|"]
    for name, target, figure, verdict in goals(result):
        lines.append(f"| {name} | {target} | {_f(figure)} | {verdict if not dry else verdict + ' (dry run: meaningless)'} |")
    if raw.get("schema_problems"):
        lines += ["", "## Schema problems (scale.json not written; see scale.invalid.json)", ""]
        lines += [f"- {p}" for p in raw["schema_problems"]]
    lines += ["", "## Processes", "", "| part | round | library | seconds | exit | rows | errors |", "|---|---:|---|---:|---|---:|---|"]
    for p in raw["processes"]:
        errors = "; ".join(r["error"][:160] for r in p["rows"] if "error" in r)
        lines.append(f"| {p['part']} | {p['round']} | {p['library']} | {p['seconds']:.0f} | {p['returncode']} | {len(p['rows'])} | {errors or '–'} |")
    for s in raw["skipped"]:
        lines.append(f"| {s['part']} | {s['round']} | {s['library']} | – | skipped: {s['why']} | 0 | – |")
    return "\n".join(lines) + "\n"
