"""Triton KV-cache store (`store_kv`) against `store_kv_reference`: bit-exact copies.

Caches start NaN-filled, so a slot written that should not be (or a -1 slot stored) shows
as a mismatch, and every slot that should be written is compared.
"""

from __future__ import annotations

import pytest
import torch
from kernel_targets import Target

from tpserve.kernels.kv_cache import store_kv, store_kv_reference

# (tokens, groups g, query heads per group n/g, head dim d, num_blocks, block_size, share of
# slots set to -1): keys and values are views of a fused QKV tensor [t, g, n/g + 2, d], as the
# model passes them.
CASES = [
    (1, 1, 1, 64, 8, 16, 0.0),
    (37, 2, 4, 128, 20, 4, 0.3),
    (100, 8, 1, 64, 13, 8, 0.1),
    (5, 5, 1, 128, 4, 16, 1.0),  # every slot -1: nothing is written
    (64, 4, 8, 64, 64, 1, 0.0),  # one token per block
    (30, 3, 5, 128, 10, 3, 0.5),  # block size not a power of two
]


@pytest.mark.parametrize("t, g, hpg, d, num_blocks, block_size, skip", CASES)
def test_store_kv_matches_reference(target: Target, t, g, hpg, d, num_blocks, block_size, skip):
    gen = torch.Generator().manual_seed(t * 1000 + d)
    qkv = target.randn(t, g, hpg + 2, d, generator=gen)
    key, value = qkv[:, :, hpg], qkv[:, :, hpg + 1]  # [t, g, d] strided views
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots[torch.rand(t, generator=gen) < skip] = -1
    slots = slots.to(target.device)
    k_cache = torch.full((num_blocks, block_size, g, d), float("nan"), dtype=target.dtype, device=target.device)
    v_cache = torch.full_like(k_cache, float("nan"))
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kv_reference(key, value, want_k, want_v, slots)

    store_kv(key, value, k_cache, v_cache, slots)

    torch.testing.assert_close(k_cache, want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, want_v, rtol=0, atol=0, equal_nan=True)


def test_store_kv_int32_slots_into_one_layer_of_a_bigger_buffer(interpreter):
    """The model's caches are views [layer, k/v] of one allocation; int32 slots work too."""
    gen = torch.Generator().manual_seed(3)
    buffer = torch.full((2, 2, 6, 4, 2, 64), -5.0)  # [layers, k/v, num_blocks, block_size, g, d]
    key, value = torch.randn(9, 2, 64, generator=gen), torch.randn(9, 2, 64, generator=gen)
    slots = torch.tensor([23, 0, -1, 4, 5, 6, 7, 12, 1], dtype=torch.int32)
    want = buffer.clone()
    store_kv_reference(key, value, want[1, 0], want[1, 1], slots.long())
    store_kv(key, value, buffer[1, 0], buffer[1, 1], slots)
    assert torch.equal(buffer, want)


def test_store_kv_launcher_refuses_bad_inputs(interpreter):
    key = value = torch.zeros(3, 2, 16)
    cache = torch.zeros(4, 4, 2, 16)
    slots = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="k_cache has dtype torch.float16, key has torch.float32"):
        store_kv(key, value, cache.half(), cache.half(), slots)
    with pytest.raises(ValueError, match=r"k_cache has shape \[4, 4, 3, 16\]"):
        store_kv(key, value, torch.zeros(4, 4, 3, 16), torch.zeros(4, 4, 3, 16), slots)
    with pytest.raises(ValueError, match="stride\\(0\\) == block_size \\* stride\\(1\\)"):
        padded = torch.zeros(4, 5, 2, 16)[:, :4]
        store_kv(key, value, padded, padded, slots)
    with pytest.raises(ValueError, match="slot_mapping has dtype torch.float32"):
        store_kv(key, value, cache, cache, slots.float())
