"""Shared fixtures: packaged real models, tiny random models of other families, SST-2 data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if (
    not torch.cuda.is_available()
):  # Triton kernels run in the CPU interpreter; must be set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")
# on a GPU: one tile config per kernel (each autotuned config is a ~1 s compile; the lent GPU has minutes)
os.environ.setdefault("PEFTLAB_AUTOTUNE", "0")

# under pytest-xdist (scripts/test.sh runs one worker per core): one torch thread per worker, so the workers
# share the cores instead of oversubscribing them
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from helpers import DATA_DIR, minilm_path, smollm2_path, tiny_model  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """One torch thread inside a test only (tiny GEMMs, where threads cost more than they give)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    return minilm_path()


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    return smollm2_path()


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    path = DATA_DIR / "sst2"
    if not (path / "train.tsv").is_file():
        pytest.skip(f"SST-2 data not found in {path} (set PEFTLAB_DATA)")
    return path


@pytest.fixture
def tiny():
    """Factory: tiny_model('gpt2' | 'opt' | 't5' | 'llama' | 'bert')."""
    return tiny_model
