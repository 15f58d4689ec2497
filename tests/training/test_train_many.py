"""train_many: jobs packed over one frozen base equal each job run alone (losses, gradient norms, learning rates,
weights, saved adapters), with different recipes (lr, schedule, warm-up, weight decay, clipping, optimizer, steps:
early finishers leave the pack), ranks, methods (AdaLoRA's allocator per job), dropout and sequence lengths.
"""

from __future__ import annotations

import pytest
import torch

import peftlab
from helpers import tiny_model
from peftlab.core.state import get_state
from peftlab.core.tensors import adapter_tensors
from peftlab.training.many import Recipe, TrainJob, train_many

TOL = {"rtol": 1e-5, "atol": 1e-5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def data(j, steps, rows, t):
    """Job j's batches: two fixed batches in turn."""
    out = []
    for step in range(steps):
        ids = torch.randint(1, 100, (rows, t), generator=torch.Generator().manual_seed(100 * j + step % 2))
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def jobs(tmp_path, which=(0, 1, 2)):
    targets = ["q_proj", "v_proj", "down_proj"]
    made = [
        TrainJob(peftlab.LoraConfig(r=2, alpha=4, target_modules=targets, adapter_name="a"), data(0, 10, 2, 6),
                 Recipe(lr=2e-2, steps=10, warmup_steps=2, schedule="linear", weight_decay=0.1, max_grad_norm=0.25),
                 seed=1, save_dir=tmp_path / "a"),
        TrainJob(peftlab.LoraConfig(r=4, alpha=4, target_modules=targets, dropout=0.1, adapter_name="b"),
                 data(1, 6, 3, 4), Recipe(lr=0.1, steps=6, schedule="cosine", optimizer="sgd", momentum=0.9),
                 seed=2, save_dir=tmp_path / "b"),
        TrainJob(peftlab.AdaLoraConfig(init_r=4, target_r=2, total_steps=8, t_init=2, t_final=2, delta_t=1,
                                       target_modules=["k_proj", "o_proj"], adapter_name="c"),
                 data(2, 8, 1, 6), Recipe(lr=3e-2, steps=8, schedule="constant"), seed=3, save_dir=tmp_path / "c"),
    ]
    return [made[i] for i in which]


def weights(model, name):
    return {k: v.detach().clone() for k, v in adapter_tensors(model, name).items()}


def test_packed_jobs_equal_each_job_alone(tmp_path):
    model = tiny_model("llama")
    packed = train_many(model, jobs(tmp_path / "pack"))
    assert [packed[n].finished_at for n in "abc"] == [10, 6, 8]  # b and c left the pack early
    for j, name in enumerate("abc"):
        alone_model = tiny_model("llama")
        alone = train_many(alone_model, jobs(tmp_path / "alone", [j]))[name]
        res = packed[name]
        assert res.steps == alone.steps == len(res.losses)
        torch.testing.assert_close(torch.tensor(res.losses), torch.tensor(alone.losses), **TOL)
        torch.testing.assert_close(torch.tensor(res.grad_norms), torch.tensor(alone.grad_norms), **TOL)
        assert res.lrs == pytest.approx(alone.lrs)
        assert alone.losses[-2] < alone.losses[0]  # it trained (same batch at steps 0 and len-2)
        want = weights(alone_model, name)
        got = weights(model, name)
        for key in want:
            torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")
        reloaded = tiny_model("llama")
        peftlab.load_adapter(reloaded, res.saved)
        for key, value in weights(reloaded, name).items():
            torch.testing.assert_close(value, want[key], **TOL)
        if name == "c":  # AdaLoRA's allocator ran on the job's own steps: the same ranks as alone
            pattern = get_state(model, "c").config.rank_pattern
            assert pattern and pattern == get_state(alone_model, "c").config.rank_pattern
    assert max(packed["a"].grad_norms) > 0.25  # clipping was exercised


@pytest.mark.parametrize("jobs_per_pass", [2])  # passes of 2 and 1 jobs
def test_passes_over_fewer_jobs_give_the_same_training(tmp_path, jobs_per_pass):
    """A step split into passes over at most k jobs' rows equals the one-pass step (every job's rows are in one
    pass, so its gradient is the same): losses, gradient norms and weights."""
    one_model, split_model = tiny_model("llama"), tiny_model("llama")
    one = train_many(one_model, jobs(tmp_path / "one"))
    split = train_many(split_model, jobs(tmp_path / "split"), jobs_per_pass=jobs_per_pass)
    for name in "abc":
        torch.testing.assert_close(torch.tensor(split[name].losses), torch.tensor(one[name].losses), **TOL)
        torch.testing.assert_close(torch.tensor(split[name].grad_norms), torch.tensor(one[name].grad_norms), **TOL)
        want = weights(one_model, name)
        for key, value in weights(split_model, name).items():
            torch.testing.assert_close(value, want[key], **TOL)
    with pytest.raises(peftlab.ConfigError, match=r"jobs_per_pass must be an integer ≥ 1 .* got 0"):
        train_many(tiny_model("llama"), jobs(tmp_path / "bad"), jobs_per_pass=0)


def test_bad_jobs_are_refused_with_what_is_valid(tmp_path):
    model = tiny_model("llama")
    twice = jobs(tmp_path, (0, 0))
    with pytest.raises(peftlab.ConfigError, match=r"must differ; repeated: \['a'\]"):
        train_many(model, twice)
    bad = jobs(tmp_path, (0,))
    bad[0].recipe.schedule = "step"
    with pytest.raises(peftlab.ConfigError, match=r"job 'a': recipe schedule='step'; valid: linear, cosine, constant"):
        train_many(tiny_model("llama"), bad)
    short = jobs(tmp_path, (0,))
    short[0].data = short[0].data[:3]
    with pytest.raises(peftlab.ConfigError, match=r"job 'a': its data ran out after 3 batches; it needs 10"):
        train_many(tiny_model("llama"), short)


def test_one_job_equals_a_hand_written_loop(tmp_path):
    """The recipe means what it says: AdamW with decoupled weight decay, linear warm-up then linear decay on the
    job's own steps, clipping on the job's own gradient norm (a pack of one against the plain loop)."""
    job = jobs(tmp_path, (0,))[0]
    got_model = tiny_model("llama")
    got = train_many(got_model, [job])["a"]

    model = tiny_model("llama")
    torch.manual_seed(job.seed)
    peftlab.wrap(model, peftlab.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                           adapter_name="a"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.1)
    losses = []
    for step, batch in enumerate(data(0, 10, 2, 6)):
        opt.param_groups[0]["lr"] = 2e-2 * ((step + 1) / 2 if step < 2 else (10 - step) / 8)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 100), batch["labels"][:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.25)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(losses), **TOL)
    want = weights(model, "a")
    for key, value in weights(got_model, "a").items():
        torch.testing.assert_close(value, want[key], **TOL)
