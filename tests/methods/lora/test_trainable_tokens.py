"""Trainable tokens (LoraConfig(trainable_token_indices=...), HF PEFT's TrainableTokensLayer): only the chosen rows
of the embedding train and are saved, a tied head gets the same rows, the merge is exact and undone bit for bit,
and HF PEFT loads our export with our logits and we load its adapters with its logits."""

from __future__ import annotations

import warnings

import pytest
import torch
from arch_zoo import build, inputs, logits

import peftlab
from helpers import perturb
from peftlab.core.tensors import adapter_state_dict
from peftlab.util.errors import ConfigError

peft = pytest.importorskip("peft")

# tokens the test inputs hold (2 = </s> ends every row) and one they do not (9)
IDS = [2, 46, 88, 9]


def _out(model, arch):
    with torch.no_grad():
        return logits(model(**inputs(arch)))


def _table(model):
    emb = model.get_input_embeddings()
    return getattr(emb, "base_layer", emb).weight


@pytest.mark.parametrize(
    "arch, targets, indices",
    [
        ("Llama", ["q_proj"], IDS),  # untied head: the input rows only
        ("GPT-2", ["c_attn"], {"wte": IDS}),  # lm_head tied to wte: the same rows in the logits
        ("Gemma-3", ["q_proj"], IDS),  # scaled embedding (embed_scale), tied head
    ],
)
def test_trainable_tokens_equal_hf_peft(tmp_path, arch, targets, indices):
    config = dict(r=2, target_modules=targets, trainable_token_indices=indices)
    model = peftlab.wrap(build(arch), peftlab.LoraConfig(**config))
    base = _out(build(arch), arch)
    assert _out(model, arch).allclose(base, atol=1e-6)  # T = E[I]: the base at init
    perturb(model, 0.2)
    ours = _out(model, arch)
    peftlab.export_peft(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(build(arch), tmp_path).eval()
        native = peft.get_peft_model(build(arch), peft.LoraConfig(**config))
    assert torch.allclose(_out(theirs, arch), ours, atol=1e-5)
    assert peftlab.count_parameters(model)[0] == native.get_nb_trainable_parameters()[0]
    perturb(theirs, 0.1)  # HF PEFT's own rows, loaded back
    want = _out(theirs, arch)
    theirs.save_pretrained(tmp_path / "peft")
    back = peftlab.import_peft(build(arch), tmp_path / "peft")
    assert torch.allclose(_out(back, arch), want, atol=1e-5)


def test_only_the_chosen_rows_train_and_are_saved(tmp_path):
    model = peftlab.wrap(build("GPT-2"), peftlab.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=IDS))
    model.train()
    x = inputs("GPT-2")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(**x, labels=x["input_ids"]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    rows = model.transformer.wte.trainable_tokens_delta["default"]
    assert rows.shape == (len(IDS), 32) and not torch.equal(rows, build("GPT-2").transformer.wte.weight[IDS])
    assert torch.equal(_table(model), build("GPT-2").transformer.wte.weight)  # the table itself never changes
    peftlab.save_adapter(model, tmp_path / "a")
    saved = peftlab.load_adapter(build("GPT-2"), tmp_path / "a")
    model.eval()
    assert torch.allclose(_out(saved, "GPT-2"), _out(model, "GPT-2"), atol=1e-6)
    sizes = {k: v.numel() for k, v in adapter_state_dict(model).items() if "token" in k}
    assert sizes == {"transformer.wte.trainable_tokens_delta": len(IDS) * 32}


@pytest.mark.parametrize("arch", ["GPT-2", "Llama"])
def test_trainable_tokens_merge_is_exact_and_keeps_the_tie(arch):
    model = peftlab.wrap(build(arch), peftlab.LoraConfig(r=2, target_modules=["c_attn" if arch == "GPT-2" else "q_proj"],
                                                         trainable_token_indices=IDS))
    perturb(model, 0.2)
    ours = _out(model, arch)
    before = _table(model).clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tied-weight warning: the head follows the rows
        peftlab.merge(model)
    assert torch.allclose(_out(model, arch), ours, atol=1e-5)
    assert torch.equal(_table(model)[IDS], model.get_input_embeddings().trainable_tokens_delta["default"].detach())
    peftlab.unmerge(model)
    assert torch.equal(_table(model), before)  # bit for bit


def test_trainable_tokens_refuse_bad_input():
    with pytest.raises(ConfigError, match=r"trainable_token_indices must be a non-empty list of token ids"):
        peftlab.LoraConfig(trainable_token_indices=[1, -2])
    with pytest.raises(ConfigError, match=r"lists a token twice"):
        peftlab.LoraConfig(trainable_token_indices=[1, 1])
    with pytest.raises(ConfigError, match=r"token ids \[96\] are outside its vocabulary of 96"):
        peftlab.wrap(build("Llama"), peftlab.LoraConfig(trainable_token_indices=[5, 96]))
    with pytest.raises(ConfigError, match=r"names 'lm_head', which matches no nn.Embedding"):
        peftlab.wrap(build("Llama"), peftlab.LoraConfig(trainable_token_indices={"lm_head": [5]}))
    with pytest.raises(ConfigError, match=r"in target_modules and in trainable_token_indices"):
        peftlab.wrap(build("Llama"), peftlab.LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[5]))
    model = build("GPT-2")
    with pytest.raises(ConfigError, match=r"lm_head shares its weight with transformer.wte"):
        peftlab.wrap(model, peftlab.LoraConfig(target_modules=["c_attn", "lm_head"], trainable_token_indices=[5]))
    with pytest.raises(ConfigError, match=r"lm_head is in modules_to_save and shares its weight with transformer.wte"):
        peftlab.wrap(model, peftlab.LoraConfig(target_modules=["c_attn"], modules_to_save=["lm_head"], trainable_token_indices=[5]))
    assert not peftlab.list_adapters(model)  # all or nothing
    for name in ("a", "b"):
        peftlab.wrap(model, peftlab.LoraConfig(target_modules=["c_attn"], trainable_token_indices=[5], adapter_name=name))
    with pytest.raises(ConfigError, match=r"TokenSlot on transformer\.wte is not a LoRA that combine can rebuild"):
        peftlab.combine(model, ["a", "b"], [0.5, 0.5], how="svd", new_name="c")


def test_trainable_tokens_in_a_mixed_batch_equal_each_adapter_alone():
    model = build("GPT-2")
    for name, ids in (("a", IDS), ("b", [2, 14])):
        config = peftlab.LoraConfig(r=2, target_modules=["c_attn"], trainable_token_indices=ids, adapter_name=name)
        peftlab.wrap(model, config)
    perturb(model, 0.2)
    x = inputs("GPT-2")
    with torch.no_grad():
        mixed = model(**x, adapter_names=["a", "b"]).logits
        for row, name in enumerate(["a", "b"]):
            peftlab.set_active_adapters(model, [name])
            assert torch.allclose(mixed[row], model(**x).logits[row], atol=1e-5)
