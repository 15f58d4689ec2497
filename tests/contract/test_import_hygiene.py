"""``import peftlab`` is silent and loads no heavy optional dependency (its time is measured by
``benchmarks/import_time.py`` on a quiet machine, not asserted here: a loaded CI machine slows torch's import alone
past any fixed bound).

bitsandbytes prints a warning on import, peft costs seconds, and ``transformers.trainer_utils``
imports peft: they are loaded only when a feature needs them (e.g. ``peftlab.PeftlabCallback``).
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("bitsandbytes", "peft", "transformers.trainer", "transformers.trainer_utils")

# torch is timed on its own: a required dependency, most of the time on any machine, and what a loaded
# machine slows most; the rest is what peftlab's own import mechanics control.
PROBE = """
import sys, time
start = time.perf_counter()
import torch
torch_s = time.perf_counter() - start
import peftlab
total_s = time.perf_counter() - start
import json
with open(sys.argv[1], "w") as f:
    json.dump({"total": total_s, "beyond_torch": total_s - torch_s, "loaded": [m for m in HEAVY if m in sys.modules]}, f)
""".replace("HEAVY", repr(HEAVY))


def _import_once(tmp_path, i: int) -> dict:
    out = tmp_path / f"probe{i}.json"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", (proc.stdout, proc.stderr)  # nothing printed on import
    return json.loads(out.read_text())


def test_import_is_silent_and_light(tmp_path):
    run = _import_once(tmp_path, 0)
    assert run["loaded"] == [], run["loaded"]


def test_lazy_names_still_resolve(tmp_path):
    """``peftlab.PeftlabCallback`` (lazy) still works, and imports transformers' Trainer pieces only then."""
    code = (
        "import sys, peftlab; assert 'transformers.trainer_utils' not in sys.modules; "
        "from transformers import TrainerCallback; "
        "assert issubclass(peftlab.PeftlabCallback, TrainerCallback); "
        "assert 'PeftlabCallback' in dir(peftlab) and set(peftlab.__all__) <= set(dir(peftlab))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
