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
    x = p["x"].float().requires_grad_()
    a, b = p["clean_a"].float().requires_grad_(), p["clean_b"].float().requires_grad_()
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
