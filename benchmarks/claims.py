"""Figures as code: every measured figure in README.md and benchmarks/README.md, recomputed from its result file.

``benchmarks/claims.yaml`` lists each claim: the figure as the document writes it, the document, the committed
result file, the key path(s) into it and how the figure is computed. ``python benchmarks/claims.py`` prints each
claim with its recomputed figure and exits 1 on any difference; ``tests/docs/test_claims.py`` runs the same check
in CI and also checks that every figure-shaped number in the two documents is covered by a claim.

Key paths: dot-separated steps; ``name[k=v,k2=v2]`` selects the one element of a list of dicts whose fields
match (compared as strings); ``name[3]`` indexes; a bare name in a selector (``rows[method=full,test accuracy]``) requires that field. A ``.md`` file reads as ``{"rows": [...]}``, one dict per row
of every pipe table (header -> cell text); a ``.csv`` file likewise; a ``.jsonl`` file as ``{"rows": [...]}``.

``compute``:
  value    the key's value (``keys`` with several paths: a tuple, one value per key)
  median / min / max / spread    of the key's list of per-round values (spread: median, min, max)
  min_of / max_of / range_of     over several keys' values (range_of: min, max)
  median_abs / max_abs           of the absolute values of a list (``name[*].field`` collects one field of a list)
  paired_ratio   per-index ratios of two per-round lists: (median, min, max)
  spread_of      (median, min, max) over several keys' values
  ratio    keys[0] / keys[1];  inverse: 1 / value
  resolved two [min, max] ranges (keys[0], keys[1]): "no resolved difference" if they overlap, else "resolved"
  ratios_range   (min, max) of keys[0]/keys[1], keys[2]/keys[3], ...
  ci_resolved    an interval cell "[lo, hi]" of a difference: "no resolved difference" if it holds 0
  span_resolved  per-round ratios (one key's list, or one key per round) against 1: "no resolved difference" if min <= 1 <= max
``format``: a str.format string applied to the computed value (a tuple is spread into the fields).
"""

from __future__ import annotations

import csv
import json
import re
import statistics
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = ROOT / "benchmarks" / "claims.yaml"
_cache: dict[Path, object] = {}


def load(path: Path):
    if path not in _cache:
        text = path.read_text()
        if path.suffix == ".json":
            _cache[path] = json.loads(text)
        elif path.suffix == ".jsonl":
            _cache[path] = {"rows": [json.loads(line) for line in text.splitlines() if line.strip()]}
        elif path.suffix == ".csv":
            _cache[path] = {"rows": list(csv.DictReader(text.splitlines()))}
        elif path.suffix == ".md":
            _cache[path] = {"rows": md_rows(text)}
        else:
            raise ValueError(f"{path}: no reader for {path.suffix}")
    return _cache[path]


def md_rows(text: str) -> list[dict]:
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif all(re.fullmatch(r":?-+:?", c) for c in cells):
            continue
        else:
            rows.append(dict(zip(header, cells)))
    return rows


_STEP = re.compile(r"^(?P<name>[^\[]*)(?:\[(?P<sel>[^\]]*)\])?$")


def _split(path: str) -> list[str]:
    """Split on dots outside brackets."""
    out, depth, cur = [], 0, ""
    for i, ch in enumerate(path):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        numeric = 0 < i < len(path) - 1 and path[i - 1].isdigit() and path[i + 1].isdigit()
        if ch == "." and depth == 0 and not numeric:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


def resolve(data, path: str):
    for step in _split(path):
        m = _STEP.match(step)
        name, sel = m["name"], m["sel"]
        if name:
            data = data[name]
        if sel is None:
            continue
        if sel == "*":
            rest = path.split("[*]", 1)[1].lstrip(".")
            return [resolve(d, rest) if rest else d for d in data]
        if re.fullmatch(r"-?\d+", sel):
            data = data[int(sel)]
            continue
        parts = sel.split(",")
        want = dict(kv.split("=", 1) for kv in parts if "=" in kv)
        has = [kv for kv in parts if "=" not in kv]  # a bare name: the row must have that field (md tables)
        hits = [d for d in data if all(str(d.get(k)) == v for k, v in want.items()) and all(h in d for h in has)]
        if len(hits) != 1:
            raise KeyError(f"{step}: {len(hits)} matches")
        data = hits[0]
    return data


def _num(v):
    if isinstance(v, str):
        return float(v.replace("**", "").replace("×", "").strip())
    return v


def compute(claim: dict):
    data = load(ROOT / claim["file"])
    keys = claim.get("keys") or [claim["key"]]
    vals = [resolve(data, k) for k in keys]
    how = claim.get("compute", "value")
    if how == "value":
        return vals[0] if len(vals) == 1 else tuple(vals)
    if how in ("median", "min", "max", "spread"):
        xs = [_num(x) for x in vals[0]]
        med, lo, hi = statistics.median(xs), min(xs), max(xs)
        return {"median": med, "min": lo, "max": hi, "spread": (med, lo, hi)}[how]
    if how in ("median_abs", "max_abs"):
        xs = [abs(_num(x)) for x in vals[0] if x is not None]
        return statistics.median(xs) if how == "median_abs" else max(xs)
    if how == "paired_ratio":
        rs = [_num(a) / _num(b) for a, b in zip(vals[0], vals[1], strict=True)]
        return (statistics.median(rs), min(rs), max(rs))
    if how == "ci_resolved":  # a "[lo, hi]" interval cell of a difference: resolved when it excludes 0
        lo, hi = (float(t) for t in re.findall(r"[-+]?\d+(?:\.\d+)?", str(vals[0])))
        return "no resolved difference" if lo <= 0 <= hi else "resolved"
    xs = [_num(v) for v in vals]
    if how == "spread_of":
        return (statistics.median(xs), min(xs), max(xs))
    if how == "min_of":
        return min(xs)
    if how == "max_of":
        return max(xs)
    if how == "range_of":
        return (min(xs), max(xs))
    if how == "ratio":
        return xs[1] / xs[0] if claim.get("invert") else xs[0] / xs[1]
    if how == "inverse":
        return 1 / xs[0]
    if how == "resolved":
        (a0, a1), (b0, b1) = vals
        return "no resolved difference" if a0 <= b1 and b0 <= a1 else "resolved"
    if how == "ratios_range":  # keys: numerator, denominator, numerator, denominator, ...
        rs = [xs[i] / xs[i + 1] for i in range(0, len(xs), 2)]
        return (min(rs), max(rs))
    if how == "span_resolved":  # one key holding the per-round list, or one key per round
        xs = [_num(x) for x in (vals[0] if len(vals) == 1 else vals)]
        lo, hi = min(xs), max(xs)
        return "no resolved difference" if lo <= 1 <= hi else "resolved"
    raise ValueError(f"unknown compute {how!r}")


def render(claim: dict) -> str:
    value = compute(claim)
    fmt = claim.get("format", "{}")
    text = fmt.format(*value) if isinstance(value, tuple) else fmt.format(value)
    return text.replace("-", "−") if claim.get("minus") else text  # typographic minus, as the documents write it


def claims() -> list[dict]:
    return yaml.safe_load(CLAIMS.read_text())["claims"]


def main() -> int:
    bad = 0
    for c in claims():
        try:
            got = render(c)
        except Exception as e:  # noqa: BLE001 - report every broken claim, not only the first
            got = f"ERROR {type(e).__name__}: {e}"
        ok = got == str(c["figure"])
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {c['doc']}: {c['figure']!r} <- {got!r}  ({c['file']})")
    print(f"{len(claims()) - bad} of {len(claims())} claims match")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
