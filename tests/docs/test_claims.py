"""Every measured figure in README.md and benchmarks/README.md is recomputed from its committed result file.

``benchmarks/claims.yaml`` lists the claims (figure as written, document, file, key, computation);
``benchmarks/claims.py`` computes them. This test fails when:

- a claim's figure differs from its recomputation, or its file is missing;
- a claimed figure no longer appears in its document (edit the claim with the text);
- a figure-shaped number in a document's prose (``N×``, ``N%``, ``N MB``/``MiB``/``GB``, ``N ms``, ``N tok/s``,
  ``NeM``) is in no claim of that document and not listed under ``not_measured`` with a reason.

Code blocks and the generated architecture matrix are not prose.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = {"R": ROOT / "README.md", "B": ROOT / "benchmarks" / "README.md"}
_spec = importlib.util.spec_from_file_location("peftlab_claims", ROOT / "benchmarks" / "claims.py")
claims_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(claims_mod)
TABLE = yaml.safe_load((ROOT / "benchmarks" / "claims.yaml").read_text())
CLAIMS = TABLE["claims"]
NOT_MEASURED = TABLE.get("not_measured", [])

FIGURE = re.compile(
    r"(?<![\w.])[+−-]?\d+(?:\.\d+)?(?:\s?(?:×(?!\s?\d)|%|MB\b|MiB\b|GB\b|ms\b|tok/s|s\b|min\b)|e[+−-]?\d+\b)"
)


def _norm(text: str) -> str:
    return " ".join(text.split())


def prose(text: str) -> str:
    """The document without fenced code blocks, inline code and the generated architecture matrix."""
    text = re.sub(r"<!-- arch-matrix:begin -->.*?<!-- arch-matrix:end -->", "", text, flags=re.S)
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`]*`", "", text)


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: f"{c['doc']}:{c['figure']}:{Path(c['file']).name}")
def test_claim_recomputes(claim):
    assert (ROOT / claim["file"]).is_file(), f"{claim['file']} is not committed"
    assert claims_mod.render(claim) == str(claim["figure"]), claim


@pytest.mark.parametrize("claim", CLAIMS, ids=lambda c: f"{c['doc']}:{c['figure']}")
def test_claim_is_in_its_document(claim):
    assert _norm(str(claim["figure"])) in _norm(DOCS[claim["doc"]].read_text()), (
        f"{claim['figure']!r} is no longer in {DOCS[claim['doc']].name}: update or remove the claim"
    )


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_figure_has_a_claim(doc):
    covered = [_norm(str(c["figure"])) for c in CLAIMS if c["doc"] == doc]
    covered += [_norm(n["text"]) for n in NOT_MEASURED if n["doc"] == doc and n.get("reason")]
    missing = sorted({m.group(0) for m in FIGURE.finditer(prose(DOCS[doc].read_text()))
                      if not any(_norm(m.group(0)) in c for c in covered)})  # fmt: skip
    assert not missing, f"{DOCS[doc].relative_to(ROOT)}: figures with no claim in benchmarks/claims.yaml: {missing}"


def test_claims_come_from_results():
    for c in CLAIMS:
        assert c["file"].startswith("benchmarks/results/"), c
        assert c["doc"] in DOCS, c
        if "gpu" in c["file"].lower() or "cuda" in c["file"].lower():
            assert c["file"].startswith("benchmarks/results/gpu/"), c
