"""Writing new tokens' keys and values into the paged KV cache.

The cache of one layer is [num_blocks, block_size, g, d]; token i goes to flat slot
`slot_mapping[i]` = block * block_size + offset. A slot of -1 means "do not store" (a token
whose KV is already cached, or padding).

`store_kv_reference` is the torch version; `store_kv` the Triton one (one launch for keys and
values, reading them straight out of the fused QKV tensor through their strides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tpserve.kernels import _launch as L


def store_kv_reference(
    key: torch.Tensor,  # [t, g, d]
    value: torch.Tensor,  # [t, g, d]
    k_cache: torch.Tensor,  # [num_blocks, block_size, g, d]
    v_cache: torch.Tensor,  # [num_blocks, block_size, g, d]
    slot_mapping: torch.Tensor,  # [t] int64
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep]  # flat view: [num_blocks * block_size, g, d]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep]


@triton.jit
def _store_kv_kernel(
    # New keys and values [t, g, d] (strided views of the fused QKV are fine), last dim contiguous.
    key_ptr,
    value_ptr,
    stride_kt,
    stride_kg,
    stride_vt,
    stride_vg,
    # Caches seen as [num_blocks * block_size, g, d]: slot s is row s. Both share strides.
    k_cache_ptr,
    v_cache_ptr,
    stride_cs,
    stride_cg,
    # [t] flat slot of each new token; -1: skip.
    slot_ptr,
    num_tokens,
    G: tl.constexpr,
    D: tl.constexpr,
    # Tile: BLOCK_T tokens x BLOCK_G groups x BLOCK_D dims.
    BLOCK_T: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    grps = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    slots = tl.load(slot_ptr + toks, mask=toks < num_tokens, other=-1).to(tl.int64)
    ok = (slots >= 0)[:, None, None] & (grps < G)[None, :, None] & (dims < D)[None, None, :]  # [BT, BG, BD]
    toks = toks.to(tl.int64)
    src_k = toks[:, None, None] * stride_kt + grps[None, :, None] * stride_kg + dims[None, None, :]
    src_v = toks[:, None, None] * stride_vt + grps[None, :, None] * stride_vg + dims[None, None, :]
    dst = slots[:, None, None] * stride_cs + grps[None, :, None] * stride_cg + dims[None, None, :]
    tl.store(k_cache_ptr + dst, tl.load(key_ptr + src_k, mask=ok), mask=ok)
    tl.store(v_cache_ptr + dst, tl.load(value_ptr + src_v, mask=ok), mask=ok)


def store_kv(
    key: torch.Tensor,  # [t, g, d]
    value: torch.Tensor,  # [t, g, d]
    k_cache: torch.Tensor,  # [num_blocks, block_size, g, d]
    v_cache: torch.Tensor,  # [num_blocks, block_size, g, d]
    slot_mapping: torch.Tensor,  # [t] int
) -> None:
    """Triton `store_kv_reference`. Grid: (cdiv(t, BLOCK_T),), BLOCK_T tokens per program.

    Slots are not bounds-checked against the cache (that would need a device sync).
    """
    L.check_shape("key", key, (None, None, None))
    t, g, d = key.shape
    L.check_shape("value", value, (t, g, d))
    L.check_shape("k_cache", k_cache, (None, None, g, d))
    L.check_shape("v_cache", v_cache, tuple(k_cache.shape))
    L.check_shape("slot_mapping", slot_mapping, (t,))
    L.check_dtype("key", key, L.FLOAT_DTYPES)
    for name, x in (("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != key.dtype:
            raise ValueError(f"{name} has dtype {x.dtype}, key has {key.dtype}; the cache stores without casting")
    L.check_dtype("slot_mapping", slot_mapping, L.INDEX_DTYPES)
    L.check_unit_last_stride(key=key, value=value)
    L.check_paged_cache("k_cache", k_cache)
    if v_cache.stride() != k_cache.stride():
        raise ValueError(f"k_cache and v_cache strides differ: {k_cache.stride()} vs {v_cache.stride()}")
    if t > 1 and slot_mapping.stride(0) != 1:
        raise ValueError("slot_mapping must be contiguous")
    device = L.check_same_device(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    L.check_runnable(_store_kv_kernel, device)
    if t == 0:
        return

    block_g, block_d = L.next_pow2(g), L.next_pow2(d)
    # Memory-bound: ~4k elements of K (and of V) per program on a GPU; few programs when interpreting.
    per_program = 1 << 16 if L.interpreting(device) else 4096
    block_t = min(L.next_pow2(t), max(1, per_program // (block_g * block_d)))
    grid = (L.cdiv(t, block_t),)
    _store_kv_kernel[grid](
        key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache, v_cache, k_cache.stride(1), k_cache.stride(2),
        slot_mapping, t,
        G=g, D=d,
        BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_D=block_d,
        num_warps=4,
    )
