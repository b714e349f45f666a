"""Paged attention on the CPU: the native kernel (kernels/csrc/paged_attention_cpu.c).

Same semantics and arguments as `paged_attention_reference` (kernels/attention.py), for
decodes, prefills and mixed steps alike, reading each key and value straight from the paged
cache instead of gathering a padded copy per sequence. Queries and output are float32; the
cache is float32 or bfloat16 (widened as it is read).
"""

from __future__ import annotations

import torch

from tpserve.kernels import _launch as L
from tpserve.kernels import native

_ERRORS = {  # the C kernel's return codes
    1: (MemoryError, "the CPU attention kernel could not allocate its scratch buffers"),
    2: (ValueError, "a sequence has more queries than tokens in the cache (cu_seqlens_q vs context_lens)"),
    3: (ValueError, "cu_seqlens_q must start at 0, not decrease, and end at most at the number of query rows"),
    4: (IndexError, "a block table entry a sequence reads is not a block of the cache, or lies past its table"),
}


def paged_attention_cpu(
    query: torch.Tensor,  # [t, n, d] float32, or the grouped view [t, g, n/g, d] of the fused QKV
    k_cache: torch.Tensor,  # [num_blocks, block_size, g, d] float32 or bfloat16
    v_cache: torch.Tensor,  # [num_blocks, block_size, g, d], the same dtype
    cu_seqlens_q: torch.Tensor,  # [b + 1] int
    context_lens: torch.Tensor,  # [b] int
    block_tables: torch.Tensor,  # [b, max_blocks] int
    softmax_scale: float,
    window_left: int | None = None,
    *,
    out: torch.Tensor | None = None,  # [t, n, d] float32, contiguous in its last dim
) -> torch.Tensor:
    """Attention output [t, n, d] (into `out` where given)."""
    L.check_shape("k_cache", k_cache, (None, None, None, None))
    _, block_size, g, d = k_cache.shape
    L.check_shape("v_cache", v_cache, tuple(k_cache.shape))
    if query.dim() == 3:
        if query.shape[1] % g:
            raise ValueError(f"{query.shape[1]} query heads do not divide into {g} kv heads")
        query = query.unflatten(1, (g, query.shape[1] // g))
    t, _, hpg, _ = query.shape
    L.check_shape("query", query, (t, g, hpg, d))
    n = g * hpg
    if block_size <= 0 or d <= 0:
        raise ValueError(f"k_cache has shape {list(k_cache.shape)}: blocks and heads must not be empty")
    if d % 8:
        raise ValueError(f"head dim {d} is not a multiple of 8, which the CPU kernel needs (use the torch backend)")
    L.check_cpu_float32(query=query)
    kv_bf16 = L.check_cpu_kv_cache(k_cache, v_cache)
    L.check_cpu_index(cu_seqlens_q=cu_seqlens_q, context_lens=context_lens, block_tables=block_tables)
    if out is None:
        out = torch.empty(t, n, d, dtype=torch.float32)
    L.check_shape("out", out, (t, n, d))
    L.check_cpu_float32(out=out)
    L.check_unit_last_stride(query=query, k_cache=k_cache, v_cache=v_cache, out=out)
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share strides")
    b = context_lens.shape[0]
    L.check_shape("cu_seqlens_q", cu_seqlens_q, (b + 1,))
    L.check_shape("block_tables", block_tables, (b, None))
    cu, ctx, tables = (L.contiguous_as(x, torch.int32) for x in (cu_seqlens_q, context_lens, block_tables))
    # The kernel takes an int32 window; one that covers any context is no window.
    window = -1 if window_left is None or window_left < 0 or window_left >= 2**31 - 1 else window_left
    if b == 0 or t == 0:
        return out
    err = native.library().tpserve_paged_attention(
        query.data_ptr(), *query.stride()[:3],
        k_cache.data_ptr(), v_cache.data_ptr(), int(kv_bf16), *k_cache.stride()[:3],
        out.data_ptr(), out.stride(0), out.stride(1),
        cu.data_ptr(), ctx.data_ptr(), tables.data_ptr(), tables.stride(0), tables.shape[1],
        t, k_cache.shape[0], b, g, hpg, d, block_size,
        softmax_scale, window,
    )  # fmt: skip
    if err:
        raise _ERRORS[err][0](_ERRORS[err][1])
    return out
