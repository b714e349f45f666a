"""The native CPU RoPE + KV store (`rope_store_kv_cpu`) against `rope_reference` followed by
`store_kv_reference`, float32: rotated q and k heads in the fused QKV, value heads and dims
past the rotary dim untouched, and the same cache after the store (every slot compared, so a
write to a wrong or skipped slot fails)."""

from __future__ import annotations

import pytest
import torch
from test_rope import CASES, _tables

from tpserve.kernels.cpu_rope_store import rope_store_kv_cpu
from tpserve.kernels.kv_cache import store_kv_reference
from tpserve.kernels.rope import rope_reference

TOL = dict(rtol=1e-4, atol=1e-5)


def check(t, g, hpg, d, r, interleaved, seed, block_size=4, rotate=True, cache_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, g, hpg + 2, d, generator=gen)
    positions = torch.randint(0, 512, (t,), generator=gen)
    cos, sin = _tables(512, r, gen, "cpu")
    num_blocks = t // block_size + 3
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots[torch.rand(t, generator=gen) < 0.3] = -1  # tokens whose K/V are already cached
    k_cache = torch.randn(num_blocks, block_size, g, d, generator=gen).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, g, d, generator=gen).to(cache_dtype)

    query, key, value = qkv[:, :, :hpg].reshape(t, g * hpg, d), qkv[:, :, hpg].clone(), qkv[:, :, hpg + 1].clone()
    if rotate:
        query, key = rope_reference(query, key, positions, cos, sin, interleaved)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kv_reference(key.to(cache_dtype), value.to(cache_dtype), want_k, want_v, slots)

    got = qkv.clone()
    rope_store_kv_cpu(got, positions, cos if rotate else None, sin if rotate else None, interleaved,
                      k_cache, v_cache, slots)
    torch.testing.assert_close(got[:, :, :hpg].reshape(t, g * hpg, d), query, **TOL)
    torch.testing.assert_close(got[:, :, hpg], key, **TOL)
    assert torch.equal(got[:, :, hpg + 1], qkv[:, :, hpg + 1]), "value heads must not be touched"
    if rotate:
        assert torch.equal(got[..., r:], qkv[..., r:]), "dims past the rotary dim must not be touched"
    if cache_dtype == torch.bfloat16:  # stored rounded to nearest even, as torch converts
        torch.testing.assert_close(k_cache, want_k, rtol=2**-8, atol=1e-5)
    else:
        torch.testing.assert_close(k_cache, want_k, **TOL)
    assert torch.equal(v_cache, want_v)


@pytest.mark.parametrize("t, g, hpg, d, r, interleaved", CASES)
def test_matches_the_references(t, g, hpg, d, r, interleaved):
    check(t, g, hpg, d, r, interleaved, seed=t * 31 + d)


@pytest.mark.parametrize("t, g, hpg, d, r, interleaved", CASES[:4])
def test_a_bfloat16_cache(t, g, hpg, d, r, interleaved):
    check(t, g, hpg, d, r, interleaved, seed=t * 17 + d, cache_dtype=torch.bfloat16)


def test_without_rotary_only_stores():
    check(17, 2, 3, 64, 64, False, seed=1, rotate=False)


def test_refuses_bad_inputs():
    qkv = torch.zeros(4, 2, 3, 16)
    cos = sin = torch.zeros(10, 8)
    pos = torch.zeros(4, dtype=torch.int64)
    slots = torch.arange(4)
    cache = torch.zeros(3, 4, 2, 16)
    with pytest.raises(IndexError, match="position id is outside the cos/sin tables"):
        rope_store_kv_cpu(qkv, pos + 10, cos, sin, False, cache, cache.clone(), slots)
    with pytest.raises(IndexError, match="past the end of the cache"):
        rope_store_kv_cpu(qkv, pos, cos, sin, False, cache, cache.clone(), slots + 9)
    with pytest.raises(ValueError, match="positions has dtype torch.float32"):
        rope_store_kv_cpu(qkv, pos.float(), cos, sin, False, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match=r"cos_cache has shape \[10, 8, 1\]"):
        rope_store_kv_cpu(qkv, pos, cos[..., None], sin[..., None], False, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="qkv must be a float32 CPU tensor"):
        rope_store_kv_cpu(qkv.double(), pos, cos, sin, False, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="do not fit head dim 16"):
        rope_store_kv_cpu(qkv, pos, torch.zeros(10, 9), torch.zeros(10, 9), False, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match=r"k_cache has shape \[3, 4, 1, 16\]"):
        rope_store_kv_cpu(qkv, pos, cos, sin, False, cache[:, :, :1], cache[:, :, :1].clone(), slots)
