"""HF PEFT AdaLoRA configs: every default imports; an option peftlab does not implement is refused by name."""

from __future__ import annotations

import pytest

import peftlab
from peftlab.methods.adalora.method import from_peft_config

peft = pytest.importorskip("peft")


def _peft_dict(**changes) -> dict:
    data = peft.AdaLoraConfig(total_step=10, target_modules=["q_proj", "v_proj"], **changes).to_dict()
    return {k: (v.value if hasattr(v, "value") else v) for k, v in data.items()}


def test_every_default_imports():
    config = from_peft_config(_peft_dict())
    assert (config.init_r, config.target_r, config.total_steps) == (12, 8, 10)


@pytest.mark.parametrize("option", [{"lora_bias": True}, {"use_rslora": True}, {"layers_to_transform": [0]}])
def test_unsupported_option_is_refused_by_name(option):
    name = next(iter(option))
    with pytest.raises(peftlab.ConfigError, match=rf"AdaLoRA option\(s\) not supported by peftlab: {name}="):
        from_peft_config(_peft_dict(**option))
