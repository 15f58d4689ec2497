"""Mixed batches in training: k adapters trained jointly on disjoint rows (one pass, ``adapter_names``) equal k
separate trainings with the same seeds, data order and recipe (losses and adapter weights after 10 steps, fp32),
with SGD and AdamW, different learning rates and ranks, dropout on per-job streams, both CPU LoRA paths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import peftlab
from helpers import tiny_model
from peftlab.core.tensors import adapter_tensors
from peftlab.serving import router as mixed
from peftlab.serving.hooks import set_row_streams
from peftlab.serving.train_rows import on_stream

STEPS, T = 10, 6
TOL = {"rtol": 1e-5, "atol": 1e-5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lora(name, r, dropout=0.0, **kw):
    return peftlab.LoraConfig(r=r, alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"], dropout=dropout,
                              adapter_name=name, **kw)


CONFIGS = {
    "lora": lambda name, j: lora(name, [2, 4, 8][j], dropout=0.1 * (j % 2)),
    "dora": lambda name, j: lora(name, [2, 4, 8][j], dropout=0.1 * (j % 2), use_dora=True),
    "adalora": lambda name, j: peftlab.AdaLoraConfig(init_r=[3, 5, 4][j], target_r=2, total_steps=STEPS,
                                                     target_modules=["k_proj", "o_proj"], dropout=0.1 * (j % 2),
                                                     orth_reg_weight=0.0, adapter_name=name),
    "bottleneck": lambda name, j: peftlab.AdapterConfig(bottleneck_size=[4, 8, 6][j], dropout=0.1 * (j % 2),
                                                        style=["houlsby", "parallel", "pfeiffer"][j], adapter_name=name),
    "prefix": lambda name, j: peftlab.PrefixConfig(num_virtual_tokens=[3, 5, 4][j], adapter_name=name),
    "head_copy": lambda name, j: lora(name, [2, 4, 8][j], modules_to_save=["lm_head"]),
}


ROWS_OF = [2, 3, 1]  # rows per job: uneven segments (the padded path pads)


def batch(j, step):
    """Job j's batch at ``step``: two fixed batches in turn (so that the loss falls)."""
    return torch.randint(1, 100, (ROWS_OF[j], T), generator=torch.Generator().manual_seed(1000 * j + step % 2))


def interleave(k, step):
    """All jobs' rows and a base row in one batch, interleaved (each job's rows in its own order):
    (ids, names, {job: its row indices})."""
    slots = [f"job{j}" for j in range(k) for _ in range(ROWS_OF[j])] + ["__base__"]
    perm = torch.randperm(len(slots), generator=torch.Generator().manual_seed(7)).tolist()
    names = [slots[i] for i in perm]
    where = {n: torch.tensor([m for m, x in enumerate(names) if x == n]) for n in set(names)}
    ids = torch.empty(len(names), T, dtype=torch.long)
    for j in range(k):
        ids[where[f"job{j}"]] = batch(j, step)
    ids[where["__base__"]] = batch(0, step + 1)[:1]
    return ids, names, where


def lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def make_opt(kind, groups):
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=0.9)
    return torch.optim.AdamW(groups, weight_decay=0.01)


def params(model, name):
    return [t for t in adapter_tensors(model, name).values() if t.requires_grad]


def separate(method, j, opt_kind, lr):
    model = tiny_model("llama")
    torch.manual_seed(100 + j)
    peftlab.wrap(model, CONFIGS[method](f"job{j}", j))
    model.train()
    opt = make_opt(opt_kind, [{"params": params(model, f"job{j}"), "lr": lr}])
    losses = []
    for step in range(STEPS):
        ids = batch(j, step)
        loss = lm_loss(model(input_ids=ids).logits, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in adapter_tensors(model, f"job{j}").items()}


def joint(method, k, opt_kind, lrs):
    model = tiny_model("llama")
    streams = {}
    for j in range(k):
        gen = streams[f"job{j}"] = torch.Generator().manual_seed(100 + j)
        with on_stream(gen):  # the adapter's init draws from its own stream, as it does alone
            peftlab.wrap(model, CONFIGS[method](f"job{j}", j))
    set_row_streams(model, streams)
    peftlab.set_trainable(model, list(streams))
    model.train()
    opt = make_opt(opt_kind, [{"params": params(model, f"job{j}"), "lr": lrs[j]} for j in range(k)])
    losses = [[] for _ in range(k)]
    for step in range(STEPS):
        ids, names, where = interleave(k, step)
        logits = model(input_ids=ids, adapter_names=names).logits
        per_job = [lm_loss(logits[where[f"job{j}"]], ids[where[f"job{j}"]]) for j in range(k)]
        torch.stack(per_job).sum().backward()
        opt.step()
        opt.zero_grad()
        for j in range(k):
            losses[j].append(per_job[j].item())
    weights = [{key: v.detach().clone() for key, v in adapter_tensors(model, f"job{j}").items()} for j in range(k)]
    return losses, weights


def check(method, opt_kind, lrs):
    losses, weights = joint(method, len(lrs), opt_kind, lrs)
    for j, lr in enumerate(lrs):
        alone_losses, alone_weights = separate(method, j, opt_kind, lr)
        torch.testing.assert_close(torch.tensor(losses[j]), torch.tensor(alone_losses), **TOL)
        assert alone_losses[-2] < alone_losses[0]  # it trained (steps 0 and 8 see the same batch)
        assert weights[j].keys() == alone_weights.keys()
        for key in alone_weights:
            torch.testing.assert_close(weights[j][key], alone_weights[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture(params=["segments", "gather"])
def lora_path(request, monkeypatch):
    monkeypatch.setattr(mixed.Router, "use_segments", lambda self, tokens: request.param == "segments")
    return request.param


@pytest.mark.parametrize("opt_kind", ["sgd", "adamw"])
def test_lora_joint_equals_separate(opt_kind, lora_path):
    """Three jobs (ranks 2, 4, 8; the second with dropout 0.1 on its own stream), three learning rates."""
    check("lora", opt_kind, [0.05, 0.02, 0.1] if opt_kind == "sgd" else [1e-2, 3e-3, 2e-2])


@pytest.mark.parametrize("method", ["dora", "adalora", "bottleneck", "prefix", "head_copy"])
def test_other_methods_joint_equal_separate(method):
    """Two jobs per method (different sizes, the second with dropout where the method has it), AdamW."""
    check(method, "adamw", [3e-2, 1e-2])


class _CountGemms(TorchDispatchMode):
    GEMMS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "linear"}

    def __init__(self):
        super().__init__()
        self.gemms = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.gemms += func.__name__.split(".")[0] in self.GEMMS
        return func(*args, **(kwargs or {}))


def test_gemms_do_not_grow_with_the_number_of_jobs(lora_path):
    """Forward + backward of a training mixed batch launch as many GEMMs for 2 jobs as for 8 (no loop over
    adapters in the products), and every job's adapter gets a gradient from its rows only."""
    counts = {}
    for n in (2, 8):
        model = tiny_model("llama")
        for i in range(n):
            peftlab.wrap(model, peftlab.LoraConfig(r=2 + i % 3, target_modules="all-linear", adapter_name=f"a{i}"))
        peftlab.set_trainable(model, [f"a{i}" for i in range(n)])
        model.train()
        x = torch.randint(1, 100, (16, T), generator=torch.Generator().manual_seed(0))
        names = [f"a{i % n}" for i in range(16)]
        names[3] = "__base__"
        with _CountGemms() as counter:
            logits = model(input_ids=x, adapter_names=names).logits
            logits[names.index("a1")].sum().backward()  # only a row of a1
        counts[n] = counter.gemms
        grads = {k: p.grad for k, p in model.named_parameters() if "lora_B" in k}
        assert all(g is not None and g.abs().sum() > 0 for k, g in grads.items() if k.endswith(".a1"))
        assert all(g is None or g.abs().sum() == 0 for k, g in grads.items() if not k.endswith(".a1"))
    assert counts[2] == counts[8], counts


@pytest.mark.parametrize("checkpointing", ["full", "selective"])
def test_gradient_checkpointing_recomputes_the_same_rows_and_draws(checkpointing):
    """Recompute in backward runs routed as the forward did and replays each job's dropout draws: the
    gradients equal those without checkpointing (a recompute that drew anew, or ran unrouted, would differ)."""
    def grads(enable):
        model = tiny_model("llama")
        streams = {}
        for j in range(2):
            gen = streams[f"job{j}"] = torch.Generator().manual_seed(100 + j)
            with on_stream(gen):
                peftlab.wrap(model, lora(f"job{j}", 2 + 2 * j, dropout=0.3))
        perturb_b(model)
        set_row_streams(model, streams)
        peftlab.set_trainable(model, list(streams))
        if enable:
            peftlab.enable_gradient_checkpointing(model, selective=checkpointing == "selective")
        model.train()
        ids, names, _ = interleave(2, 0)
        model(input_ids=ids, adapter_names=names).logits.pow(2).mean().backward()
        return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    want, got = grads(False), grads(True)
    assert want.keys() == got.keys() and len(want) > 0
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL)


def perturb_b(model):
    """B away from zero, so that A and the input get gradients through the dropped inputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
