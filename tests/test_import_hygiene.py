"""``import peftlab`` is fast, silent, and loads no heavy optional dependency.

bitsandbytes prints a warning on import, peft costs seconds, and ``transformers.trainer_utils``
imports peft: they are loaded only when a feature needs them (e.g. ``peftlab.PeftlabCallback``).
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("bitsandbytes", "peft", "transformers.trainer", "transformers.trainer_utils")

PROBE = """
import sys, time
start = time.perf_counter()
import peftlab
elapsed = time.perf_counter() - start
import json
with open(sys.argv[1], "w") as f:
    json.dump({"seconds": elapsed, "loaded": [m for m in HEAVY if m in sys.modules]}, f)
""".replace("HEAVY", repr(HEAVY))


def _import_once(tmp_path, i: int) -> dict:
    out = tmp_path / f"probe{i}.json"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", (proc.stdout, proc.stderr)  # nothing printed on import
    return json.loads(out.read_text())


def test_import_is_fast_silent_and_light(tmp_path):
    runs = [_import_once(tmp_path, i) for i in range(3)]
    assert all(r["loaded"] == [] for r in runs), runs[0]["loaded"]
    best = min(r["seconds"] for r in runs)
    print(f"import peftlab: {best:.2f} s (best of 3)")
    assert best < 3.0, f"import peftlab took {best:.2f} s (target 1.5 s on a quiet machine)"


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
