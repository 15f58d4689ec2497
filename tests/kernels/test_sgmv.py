"""SGMV / BGMV multi-adapter kernels vs the torch references (Triton's CPU interpreter without a GPU).

Odd shapes, ranks {4, 8, 16, 64}, mixed ranks in one table, empty segments, rows with no adapter
(``__base__``: segment or index -1), with and without a row permutation, scales, half precision.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from peftlab.kernels import reference
from peftlab.kernels import sgmv as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tables(n, R, K_in, N, ranks, dtype=torch.float32, seed=0):
    """Stacked A (n, R, K) and Bᵀ (n, R, N) zero-padded past each adapter's rank, as mixed_batch builds them."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, R, K_in, generator=g) / K_in**0.5
    b = torch.randn(n, R, N, generator=g) * 0.1
    for i, r in enumerate(ranks):
        a[i, r:] = 0
        b[i, r:] = 0
    return a.to(DEVICE, dtype), b.to(DEVICE, dtype)


def segments(lengths, adapters):
    start = torch.tensor([0] + list(lengths[:-1])).cumsum(0)
    return start.to(DEVICE), torch.tensor(lengths).to(DEVICE), torch.tensor(adapters).to(DEVICE)


def close(got, want, dtype=torch.float32):
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("rank", [4, 8, 16, 64])
def test_sgmv_matches_reference_per_rank(rank):
    M, K_in, N = 37, 45, 53  # odd everywhere: every tile is partial
    a, b = tables(3, rank, K_in, N, [rank] * 3)
    x = torch.randn(M, K_in, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = torch.randn(M, N, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    start, length, adapter = segments([11, 0, 19, 7], [2, 1, 0, -1])  # an empty segment and base rows
    t = K.sgmv_shrink(x, a, start, length, adapter, max_len=19, perm=perm)
    t_ref = reference.sgmv_shrink(x, a, start, length, adapter, perm=perm)
    close(t, t_ref)
    scales = torch.tensor([0.5, 2.0, -1.5]).to(DEVICE)
    want = reference.sgmv_expand(y, t_ref, b, start, length, adapter, perm=perm, scales=scales)
    got = K.sgmv_expand(y.clone(), t, b, start, length, adapter, max_len=19, perm=perm, scales=scales)
    close(got, want)
    base_rows = perm[30:].long()  # the -1 segment: untouched, bit for bit
    assert torch.equal(got[base_rows], y[base_rows])


def test_sgmv_mixed_ranks_in_one_table_and_no_perm():
    M, K_in, N, R = 41, 70, 33, 128  # R = 128: the shrink splits the rank into two tiles
    ranks = torch.tensor([4, 128, 8, 70], dtype=torch.int32)
    a, b = tables(4, R, K_in, N, ranks.tolist())
    # the padding past each rank holds garbage: ranks must keep the kernels from reading it
    a_dirty, b_dirty = a.clone(), b.clone()
    for i, r in enumerate(ranks.tolist()):
        a_dirty[i, r:] = 7.0
        b_dirty[i, r:] = -3.0
    x = torch.randn(M, K_in).to(DEVICE)
    y = torch.randn(M, N).to(DEVICE)
    start, length, adapter = segments([5, 17, 1, 18], [3, 0, 2, 1])
    t = K.sgmv_shrink(x, a_dirty, start, length, adapter, max_len=18, ranks=ranks)
    t_ref = reference.sgmv_shrink(x, a, start, length, adapter)
    close(t, t_ref)
    got = K.sgmv_expand(y.clone(), t, b_dirty, start, length, adapter, max_len=18, ranks=ranks)
    close(got, reference.sgmv_expand(y, t_ref, b, start, length, adapter))


def test_sgmv_only_empty_or_base_segments_is_a_no_op():
    a, b = tables(2, 16, 20, 24, [16, 16])
    x, y = torch.randn(9, 20).to(DEVICE), torch.randn(9, 24).to(DEVICE)
    start, length, adapter = segments([0, 9, 0], [0, -1, 1])
    t = K.sgmv_shrink(x, a, start, length, adapter, max_len=9)
    assert not t.any()
    assert torch.equal(K.sgmv_expand(y.clone(), t, b, start, length, adapter, max_len=9), y)


@pytest.mark.parametrize("rank", [4, 16, 64])
def test_bgmv_matches_reference_with_base_rows(rank):
    M, K_in, N = 13, 77, 45
    ranks = torch.tensor([rank, max(1, rank // 2), rank], dtype=torch.int32)  # mixed ranks too
    a, b = tables(3, rank, K_in, N, ranks.tolist())
    x, y = torch.randn(M, K_in).to(DEVICE), torch.randn(M, N).to(DEVICE)
    idx = torch.tensor([0, 2, -1, 1, 1, 0, -1, 2, 2, 2, 0, 1, -1]).to(DEVICE)
    t = K.bgmv_shrink(x, a, idx, ranks=ranks)
    t_ref = reference.bgmv_shrink(x, a, idx, ranks=ranks)
    close(t, t_ref)
    scales = torch.tensor([1.0, -0.25, 3.0]).to(DEVICE)
    got = K.bgmv_expand(y.clone(), t, b, idx, ranks=ranks, scales=scales)
    close(got, reference.bgmv_expand(y, t_ref, b, idx, ranks=ranks, scales=scales))
    assert torch.equal(got[idx < 0], y[idx < 0])


INTERPRETED = not torch.cuda.is_available()
BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(
        INTERPRETED,
        reason="the Triton CPU interpreter does not emulate bf16 tl.dot (numpy has no bfloat16); runs on GPU",
    ),
)


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
def test_sgmv_half_precision(dtype):
    M, K_in, N, R = 24, 48, 40, 16
    a, b = tables(2, R, K_in, N, [R, 8], dtype=dtype)
    x, y = torch.randn(M, K_in).to(DEVICE, dtype), torch.randn(M, N).to(DEVICE, dtype)
    start, length, adapter = segments([10, 14], [1, 0])
    t = K.sgmv_shrink(x, a, start, length, adapter, max_len=14)
    t_ref = reference.sgmv_shrink(x, a, start, length, adapter)
    close(t, t_ref, dtype)
    got = K.sgmv_expand(y.clone(), t, b, start, length, adapter, max_len=14)
    assert got.dtype == dtype
    close(got, reference.sgmv_expand(y, t_ref, b, start, length, adapter), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bgmv_half_precision(dtype):
    M, K_in, N, R = 24, 48, 40, 16
    a, b = tables(2, R, K_in, N, [R, 8], dtype=dtype)
    x, y = torch.randn(M, K_in).to(DEVICE, dtype), torch.randn(M, N).to(DEVICE, dtype)
    idx = torch.tensor([0, 1, -1] * 8).to(DEVICE)
    t = K.bgmv_shrink(x, a, idx)
    t_ref = reference.bgmv_shrink(x, a, idx)
    close(t, t_ref, dtype)
    got = K.bgmv_expand(y.clone(), t, b, idx)
    assert got.dtype == dtype
    close(got, reference.bgmv_expand(y, t_ref, b, idx), dtype)


def test_bad_shapes_say_what_is_expected():
    a, b = tables(2, 16, 20, 24, [16, 16])
    x = torch.randn(5, 21).to(DEVICE)
    with pytest.raises(ValueError, match=r"\(n_adapters, R, 21\)"):
        K.bgmv_shrink(x, a, torch.zeros(5, dtype=torch.long).to(DEVICE))
    with pytest.raises(ValueError, match="one entry per row"):
        K.bgmv_shrink(torch.randn(5, 20).to(DEVICE), a, torch.zeros(4, dtype=torch.long).to(DEVICE))
    big = torch.zeros(1, 256, 20).to(DEVICE)
    with pytest.raises(ValueError, match="rank 256 > 128"):
        K.bgmv_shrink(torch.randn(5, 20).to(DEVICE), big, torch.zeros(5, dtype=torch.long).to(DEVICE))
