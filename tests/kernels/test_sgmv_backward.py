"""SGMV backward (per-row adapters in training) vs its torch reference and torch autograd (Triton's CPU
interpreter without a GPU).

Odd shapes (K, N not multiples of the tiles), mixed ranks 1/3/8 with garbage past each rank, an empty segment,
a one-row segment, an adapter in two segments, an adapter with no rows, base rows, a row permutation,
per-adapter scales; fp32 and fp16 (bf16 on a GPU). Then the layer: a mixed training batch through the kernels
gives the gradients of the torch path.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from peftlab.kernels import reference  # noqa: E402
from peftlab.kernels import sgmv_backward as KB  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = not torch.cuda.is_available()

M, K_IN, N = 41, 45, 53  # odd everywhere: every tile is partial
RANKS = [3, 1, 8, 3, 8]  # adapter 3: only an empty segment; adapter 4: no segment at all
# segments: adapter 2 (13 rows), 3 (empty), 1 (one row), 0 (20 rows), 2 again (3 rows), base (4 rows)
LENGTHS, ADAPTERS = [13, 0, 1, 20, 3, 4], [2, 3, 1, 0, 2, -1]


def problem(dtype=torch.float32, dirty=True):
    g = torch.Generator().manual_seed(0)
    n, R = len(RANKS), max(RANKS)
    a = torch.randn(n, R, K_IN, generator=g) / K_IN**0.5
    b = torch.randn(n, R, N, generator=g) * 0.3
    clean_a, clean_b = a.clone(), b.clone()
    for i, r in enumerate(RANKS):
        clean_a[i, r:] = 0
        clean_b[i, r:] = 0
        if dirty:  # garbage past each rank: the ranks must keep the kernels from reading it
            a[i, r:], b[i, r:] = 5.0, -2.0
    x = torch.randn(M, K_IN, generator=g)
    dy = torch.randn(M, N, generator=g)
    perm = torch.randperm(M, generator=g)
    start = torch.tensor([0, *LENGTHS[:-1]]).cumsum(0)
    seg = [t.to(DEVICE) for t in (start, torch.tensor(LENGTHS), torch.tensor(ADAPTERS))]
    scales = torch.tensor([0.5, 2.0, -1.5, 3.0, 1.0])
    to = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return dict(x=to(x), dy=to(dy), a=to(a), b=to(b), clean_a=to(clean_a), clean_b=to(clean_b), seg=seg,
                perm=perm.to(DEVICE), ranks=torch.tensor(RANKS, dtype=torch.int32).to(DEVICE), scales=scales.to(DEVICE))


def close(got, want, dtype=torch.float32):
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(got.float(), want.float(), **tol)


def autograd_of_reference(p):
    """dX, dA_tab, dB_tab by torch autograd through the forward references (clean tables, fp32)."""
    x, a, b = (p[k].detach().float().clone().requires_grad_() for k in ("x", "clean_a", "clean_b"))
    t = reference.sgmv_shrink(x, a, *p["seg"], perm=p["perm"])
    y = reference.sgmv_expand(torch.zeros(M, N, device=DEVICE), t, b, *p["seg"], perm=p["perm"], scales=p["scales"])
    y.backward(p["dy"].float())
    return x.grad, a.grad, b.grad


def test_backward_matches_reference_and_autograd_fp32():
    p = problem()
    want = reference.sgmv_backward(p["dy"], p["x"], p["clean_a"], p["clean_b"], *p["seg"], perm=p["perm"],
                                   scales=p["scales"])
    for ref, auto in zip(want, autograd_of_reference(p)):  # the reference is the gradient of the forward
        close(ref, auto)
    t = KB.sgmv.sgmv_shrink(p["x"], p["a"], *p["seg"], max_len=20, perm=p["perm"], ranks=p["ranks"])
    got = KB.sgmv_backward(p["dy"], p["x"], t, p["a"], p["b"], *p["seg"], max_len=20, perm=p["perm"],
                           ranks=p["ranks"], scales=p["scales"])
    for name, g, w in zip(("dX", "dA", "dB"), got, want):
        assert g.shape == w.shape and g.dtype == torch.float32, name
        close(g, w)
    dx, da, db = got
    base = p["perm"][-4:].long()
    assert not dx[base].any()  # base rows: no LoRA gradient
    assert not da[3].any() and not db[3].any() and not da[4].any() and not db[4].any()  # adapters without rows
    for i, r in enumerate(RANKS):  # exactly zero past each rank (the garbage there is never read)
        assert not da[i, r:].any() and not db[i, r:].any()
    dirty = KB.sgmv_weight_grad(t + 9.0, p["x"], *p["seg"], n_adapters=len(RANKS), perm=p["perm"], ranks=p["ranks"])
    assert all(not dirty[i, r:].any() for i, r in enumerate(RANKS))  # t's columns past r_a are not read either


def test_autograd_op_gives_every_gradient():
    """sgmv_lora: y = base + LoRA terms; .backward() fills x, both tables and base, as autograd of the reference."""
    p = problem(dirty=False)
    leaves = [p[k].clone().requires_grad_() for k in ("x", "clean_a", "clean_b")]
    base = torch.randn(M, N, generator=torch.Generator().manual_seed(5)).to(DEVICE).requires_grad_()
    y = KB.sgmv_lora(*leaves, base, *p["seg"], max_len=20, perm=p["perm"], ranks=p["ranks"], scales=p["scales"])
    t = reference.sgmv_shrink(p["x"], p["clean_a"], *p["seg"], perm=p["perm"])
    close(y, reference.sgmv_expand(base.detach(), t, p["clean_b"], *p["seg"], perm=p["perm"], scales=p["scales"]))
    y.backward(p["dy"])
    for leaf, want in zip(leaves, autograd_of_reference(p)):
        close(leaf.grad, want)
    assert torch.equal(base.grad, p["dy"])


HALF = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRETED, reason="the Triton CPU interpreter does not emulate bf16 tl.dot (numpy has no bfloat16); runs on GPU"))]


@pytest.mark.parametrize("dtype", HALF)
def test_backward_half_precision(dtype):
    p = problem(dtype)
    t = KB.sgmv.sgmv_shrink(p["x"], p["a"], *p["seg"], max_len=20, perm=p["perm"], ranks=p["ranks"])
    got = KB.sgmv_backward(p["dy"], p["x"], t, p["a"], p["b"], *p["seg"], max_len=20, perm=p["perm"],
                           ranks=p["ranks"], scales=p["scales"])
    want = reference.sgmv_backward(p["dy"], p["x"], p["clean_a"], p["clean_b"], *p["seg"], perm=p["perm"],
                                   scales=p["scales"])
    for g, w in zip(got, want):
        assert g.dtype == dtype
        close(g, w, dtype)


def test_no_rows_gives_zero_gradients_and_bad_shapes_say_what_is_expected():
    p = problem()
    empty = [torch.tensor(v).to(DEVICE) for v in ([0, 0], [0, 0], [1, 0])]
    t = torch.zeros(M, max(RANKS), device=DEVICE)
    dx, da, db = KB.sgmv_backward(p["dy"], p["x"], t, p["a"], p["b"], *empty, max_len=0, ranks=p["ranks"])
    assert not dx.any() and not da.any() and not db.any()
    with pytest.raises(ValueError, match=r"same rows"):
        KB.sgmv_weight_grad(t[:5], p["x"], *p["seg"], n_adapters=5)
    with pytest.raises(ValueError, match=r"share \(n_adapters, R\)"):
        KB.sgmv_backward(p["dy"], p["x"], t, p["a"], p["b"][:2], *p["seg"], max_len=20)
    with pytest.raises(ValueError, match=r"base must have x's 41 rows"):
        KB.sgmv_lora(p["x"], p["a"], p["b"], p["dy"][:3], *p["seg"], max_len=20)


def test_mixed_training_batch_through_the_kernels_equals_the_torch_path(monkeypatch):
    """A training forward + backward with three LoRA jobs (ranks 1, 3, 8; one with dropout on its own stream), a base
    row and interleaved rows: the SGMV kernels and their backward (forced on, as on CUDA) give the torch path's
    loss and every adapter's gradients; each job's gradients come from its rows only."""
    import peftlab
    from helpers import tiny_model
    from peftlab.serving import router as mixed
    from peftlab.serving import train_rows
    from peftlab.serving.hooks import set_row_streams

    model = tiny_model("llama").to(DEVICE)  # CPU tensors run the kernels in the interpreter
    for j, r in enumerate((1, 3, 8)):
        peftlab.wrap(model, peftlab.LoraConfig(r=r, alpha=2 * r, target_modules=["down_proj"],
                                               dropout=0.2 * (j == 1), adapter_name=f"job{j}"))
    for i, (name, p) in enumerate(model.named_parameters()):  # B starts at zero: values, so every gradient is non-trivial
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.2)
    peftlab.set_trainable(model, ["job0", "job1", "job2"])
    model.train()
    names = ["job2", "job0", "__base__", "job2", "job1", "job2", "job0"]
    ids = torch.randint(1, 100, (len(names), 5), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    calls = []
    wgrad = KB.sgmv_weight_grad
    monkeypatch.setattr(KB, "sgmv_weight_grad", lambda *a, **k: calls.append(1) or wgrad(*a, **k))

    def run(kernels):
        monkeypatch.setattr(mixed, "_use_triton", lambda layer, x: kernels)  # on CUDA: what it says by itself
        for module in model.modules():  # the per-layer plan (kernels or not) is cached per router
            module.__dict__.pop(mixed.LAYER_PLAN_ATTR, None)
        set_row_streams(model, {f"job{j}": torch.Generator().manual_seed(10 + j) for j in range(3)})
        model.zero_grad()
        logits = model(input_ids=ids, adapter_names=names).logits
        loss = logits[[0, 1, 3, 4, 5, 6]].float().pow(2).mean()
        loss.backward()
        return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    loss_k, grads_k = run(True)
    assert calls and not train_rows._KERNELS_FAILED  # the kernels ran (2 weight gradients per adapted layer)
    n_calls = len(calls)
    loss_t, grads_t = run(False)
    assert len(calls) == n_calls  # the torch path ran no kernel
    assert loss_k == pytest.approx(loss_t, rel=1e-5)
    assert grads_k.keys() == grads_t.keys() and len(grads_k) == 3 * 2 * 2  # 3 jobs × (A, B) × 2 layers
    for key in grads_t:
        torch.testing.assert_close(grads_k[key], grads_t[key], atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
        assert grads_k[key].abs().sum() > 0, key
