"""The torch references agree with each other and with plain definitions.

These are what the Triton kernels are checked against, so they get checks of their own.
"""

from __future__ import annotations

import math

import torch

from tpserve.kernels.attention import paged_attention_reference, varlen_attention_reference
from tpserve.kernels.kv_cache import store_kv_reference


def test_store_kv_skips_minus_one_slots():
    k_cache = torch.full((4, 2, 1, 3), -7.0)
    v_cache = torch.full((4, 2, 1, 3), -7.0)
    key, value = torch.randn(3, 1, 3), torch.randn(3, 1, 3)
    store_kv_reference(key, value, k_cache, v_cache, torch.tensor([5, -1, 0]))
    assert torch.equal(k_cache[2, 1], key[0]) and torch.equal(v_cache[0, 0], value[2])
    assert (k_cache.view(-1, 1, 3)[[1, 2, 3, 4, 6, 7]] == -7.0).all()  # untouched, the -1 slot included


def test_paged_attention_equals_contiguous_attention():
    """Sequences scattered through a paged cache attend exactly as they do laid out flat."""
    g = torch.Generator().manual_seed(0)
    n, gq, d, bs = 6, 2, 8, 4
    lens = [5, 9, 1]
    q = torch.randn(sum(lens), n, d, generator=g)
    k = torch.randn(sum(lens), gq, d, generator=g)
    v = torch.randn(sum(lens), gq, d, generator=g)
    cu = torch.tensor([0, 5, 14, 15])
    k_cache, v_cache = torch.zeros(12, bs, gq, d), torch.zeros(12, bs, gq, d)
    perm = torch.randperm(12, generator=g).tolist()
    tables = torch.tensor([perm[0:3], perm[3:6], perm[6:9]])
    slots = [tables[i, p // bs] * bs + p % bs for i, L in enumerate(lens) for p in range(L)]
    store_kv_reference(k, v, k_cache, v_cache, torch.tensor(slots))
    paged = paged_attention_reference(q, k_cache, v_cache, cu, torch.tensor(lens), tables, d**-0.5)
    flat = varlen_attention_reference(q, k, v, cu, d**-0.5)
    torch.testing.assert_close(paged, flat, rtol=1e-5, atol=1e-6)


def test_sliding_window_by_definition():
    """Query p sees keys p - window_left .. p, computed here with explicit softmax."""
    g = torch.Generator().manual_seed(1)
    s, d, w = 7, 4, 2
    q, k, v = (torch.randn(s, 1, d, generator=g) for _ in range(3))
    out = varlen_attention_reference(q, k, v, torch.tensor([0, s]), 1.0, window_left=w)
    for p in range(s):
        lo = max(0, p - w)
        scores = (k[lo : p + 1, 0] @ q[p, 0]) / 1.0
        expected = torch.softmax(scores, 0) @ v[lo : p + 1, 0]
        torch.testing.assert_close(out[p, 0], expected, rtol=1e-5, atol=1e-6)
    assert not math.isnan(out.sum().item())


def test_batched_decode_equals_the_reference():
    """The CPU's batched decode path against the per-sequence reference: GQA, ragged contexts,
    shuffled blocks, partial last blocks, a sliding window, stale data in unused slots."""
    from tpserve.kernels.attention import paged_decode_attention_torch

    g = torch.Generator().manual_seed(2)
    for n, gq, d, bs, window in [(8, 2, 16, 4, None), (5, 5, 8, 8, None), (8, 1, 16, 4, 6)]:
        lens = [1, 7, 12, 4, 9]
        b = len(lens)
        k_cache = torch.randn(40, bs, gq, d, generator=g)  # stale values everywhere: must be masked
        v_cache = torch.randn(40, bs, gq, d, generator=g)
        tables = torch.randperm(40, generator=g)[: b * 4].view(b, 4).int()
        q = torch.randn(b, n, d, generator=g)
        ctx = torch.tensor(lens)
        expected = paged_attention_reference(q, k_cache, v_cache, torch.arange(b + 1), ctx, tables, 0.3, window)
        got = paged_decode_attention_torch(q, k_cache, v_cache, ctx, tables, 0.3, max(lens), window)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
