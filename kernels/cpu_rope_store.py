"""RoPE and the KV-cache store on the CPU: the native kernel (kernels/csrc/rope_store_kv_cpu.c).

`rope_reference` then `store_kv_reference`, in one pass and in place on the fused QKV tensor,
as the Triton backend does them: its query and key heads are rotated where they lie, so the
attention reads q through a strided view and nothing is split out into copies. qkv is float32;
the cache float32 or bfloat16 (rounded to nearest even as it is stored, as torch rounds).
"""

from __future__ import annotations

import torch

from tpserve.kernels import _launch as L
from tpserve.kernels import native

_ERRORS = {  # the C kernel's return codes
    1: "a position id is outside the cos/sin tables",
    2: "a slot in slot_mapping is past the end of the cache",
}


def rope_store_kv_cpu(
    qkv: torch.Tensor,  # [t, g, n/g + 2, d] float32; q and k heads rotated in place
    positions: torch.Tensor,  # [t] int
    cos_cache: torch.Tensor | None,  # [P, r/2] float32; None: no rotation (learned positions)
    sin_cache: torch.Tensor | None,
    interleaved: bool,
    k_cache: torch.Tensor,  # [num_blocks, block_size, g, d] float32 or bfloat16
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [t] int, negative: not stored
) -> None:
    L.check_shape("qkv", qkv, (None, None, None, None))
    t, g, heads, d = qkv.shape
    L.check_shape("k_cache", k_cache, (None, None, g, d))
    L.check_shape("v_cache", v_cache, tuple(k_cache.shape))
    L.check_shape("positions", positions, (t,))
    L.check_shape("slot_mapping", slot_mapping, (t,))
    L.check_cpu_index(positions=positions, slot_mapping=slot_mapping)
    tables = {} if cos_cache is None else {"cos_cache": cos_cache, "sin_cache": sin_cache}
    L.check_cpu_float32(qkv=qkv, **tables)
    kv_bf16 = L.check_cpu_kv_cache(k_cache, v_cache)
    L.check_unit_last_stride(qkv=qkv, k_cache=k_cache, v_cache=v_cache)
    L.check_paged_cache("k_cache", k_cache)
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share strides")
    if heads < 3:
        raise ValueError(f"qkv has {heads} heads per group; expected its query heads plus a key and a value head")
    rot_half = 0
    if cos_cache is not None:
        L.check_shape("cos_cache", cos_cache, (None, None))
        rot_half = cos_cache.shape[1]
        L.check_shape("sin_cache", sin_cache, tuple(cos_cache.shape))
        if 2 * rot_half > d or cos_cache.stride(1) != 1 or sin_cache.stride() != cos_cache.stride():
            raise ValueError(f"cos/sin tables {list(cos_cache.shape)} do not fit head dim {d} (or are not row-major)")
    pos, slots = L.contiguous_as(positions, torch.int64), L.contiguous_as(slot_mapping, torch.int64)
    if t == 0:
        return
    err = native.library().tpserve_rope_store_kv(
        qkv.data_ptr(), *qkv.stride()[:3],
        pos.data_ptr(),
        0 if cos_cache is None else cos_cache.data_ptr(), 0 if sin_cache is None else sin_cache.data_ptr(),
        0 if cos_cache is None else cos_cache.stride(0), 0 if cos_cache is None else cos_cache.shape[0],
        rot_half, int(interleaved),
        k_cache.data_ptr(), v_cache.data_ptr(), int(kv_bf16), k_cache.stride(1), k_cache.stride(2),
        slots.data_ptr(), k_cache.shape[0] * k_cache.shape[1],
        t, g, heads - 2, d,
    )  # fmt: skip
    if err:
        raise IndexError(_ERRORS[err])
