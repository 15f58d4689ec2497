"""The user guide's own ``train.py`` (docs/guide.md, "More than one device") under ``torchrun --nproc_per_node 2`` on a
CPU trains ONE model in one process group (gloo): both ranks end with equal adapter weights, which also
differ from the initial ones. The snippet runs as written, with two additions: a ``my_global_batches()``
(random token batches, the README leaves the data to the user) before it, and after it a few lines that
write each rank's gathered adapter weights; ``steps=500`` becomes ``steps=6`` to keep the test short. It runs
as written (FSDP2) and with ``distributed="ddp"``, the alternative its comment names.

And: when a launcher says WORLD_SIZE > 1 but the accelerator sees one process, training refuses.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO
from peftlab.util.errors import ConfigError

PRELUDE = '''
import torch

def my_global_batches():
    gen = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(1000, 5000, (4, 12), generator=gen)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (4,), generator=gen)}
'''

EPILOGUE = '''
from safetensors.torch import save_file
from peftlab.core.tensors import adapter_state_dict
from peftlab.util.dist import gather_state_dict
full = gather_state_dict(adapter_state_dict(model))
save_file({k: v.contiguous() for k, v in full.items()}, f"rank{get_rank()}.safetensors")
open(f"rank{get_rank()}.world", "w").write(str(get_world_size()))
'''


def guide_train_py(strategy: str) -> str:
    text = (REPO / "docs" / "guide.md").read_text()
    section = text[text.index("## More than one device"):]
    section = section[section.index("Your own script (`train.py`)"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "steps=500" in code, "the guide's train.py changed: update this test"
    assert 'distributed="fsdp"' in code
    return code.replace("steps=500", "steps=6").replace('distributed="fsdp"', f'distributed="{strategy}"')


@pytest.mark.parametrize("strategy", ["fsdp"])  # as written (DDP on 2 CPU processes: tests/training/test_distributed.py)
def test_readme_train_py_under_torchrun_trains_one_model(tmp_path, strategy):
    script = tmp_path / "train.py"
    script.write_text(PRELUDE + guide_train_py(strategy) + EPILOGUE)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONSAFEPATH": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=230)
    print(f"torchrun README train.py: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert [(tmp_path / f"rank{r}.world").read_text() for r in (0, 1)] == ["2", "2"]
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)
    assert any(bool(v.abs().sum() > 0) for k, v in ranks[0].items() if "lora_B" in k), "the adapter did not train"
    assert (tmp_path / "out" / "adapter_config.json").is_file() and (tmp_path / "merged" / "config.json").is_file()


class OneProcess:
    num_processes = 1


def test_a_launch_the_accelerator_does_not_see_is_refused(monkeypatch):
    from peftlab.training.loop import check_world

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2.*sees 1: each process would train a separate model"):
        check_world(OneProcess())
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_world(OneProcess())
