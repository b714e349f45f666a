"""Causal attention of packed ("thd") queries over keys and values in a paged KV cache.

One function covers prefill, decode, chunked prefill with a cached prefix, and any mix of
them in one batch. Sequence i contributes q_len_i = cu_seqlens_q[i+1] - cu_seqlens_q[i]
queries, which are the *last* q_len_i of its context_len_i tokens (already stored in the cache):

    positions:  0 ...................... context_len - q_len ........ context_len - 1
    cache:      [ cached prefix (earlier steps) | this step's tokens (just stored) ]
    queries:                                     ^ one per token of this step

Query j (position p = context_len - q_len + j) attends to keys at positions k with k <= p,
and p - k <= window_left when a sliding window is set.

This file holds the torch reference the Triton kernels are tested against; on the CPU it is
also the implementation the model runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window_left: int | None) -> torch.Tensor:
    """[q, k] bool: which keys each query may see."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window_left is not None and window_left >= 0:
        allowed &= (q_pos[:, None] - k_pos[None, :]) <= window_left
    return allowed


def paged_attention_reference(
    query: torch.Tensor,  # [t, n, d]
    k_cache: torch.Tensor,  # [num_blocks, block_size, g, d]
    v_cache: torch.Tensor,  # [num_blocks, block_size, g, d]
    cu_seqlens_q: torch.Tensor,  # [b + 1] int
    context_lens: torch.Tensor,  # [b] int, tokens in the cache per sequence, this step's included
    block_tables: torch.Tensor,  # [b, max_blocks] int, block ids in order of position
    softmax_scale: float,
    window_left: int | None = None,
) -> torch.Tensor:
    """Attention output [t, n, d], in the query's dtype; softmax in float32."""
    t, n, d = query.shape
    block_size, g = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(query)
    starts = cu_seqlens_q.tolist()
    for i, ctx in enumerate(context_lens.tolist()):
        q_start, q_end = starts[i], starts[i + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        if q_len > ctx:
            raise ValueError(f"sequence {i}: {q_len} queries but only {ctx} tokens in the cache")
        num_blocks = -(-ctx // block_size)
        blocks = block_tables[i, :num_blocks].long()
        k = k_cache[blocks].reshape(-1, g, d)[:ctx]  # [ctx, g, d]
        v = v_cache[blocks].reshape(-1, g, d)[:ctx]
        q_pos = torch.arange(ctx - q_len, ctx, device=query.device)
        mask = _allowed(q_pos, torch.arange(ctx, device=query.device), window_left)  # [q_len, ctx]
        o = F.scaled_dot_product_attention(
            query[q_start:q_end].transpose(0, 1).float(),  # [n, q_len, d]
            k.transpose(0, 1).float(),  # [g, ctx, d]
            v.transpose(0, 1).float(),
            attn_mask=mask,
            scale=softmax_scale,
            enable_gqa=n != g,
        )  # [n, q_len, d]
        out[q_start:q_end] = o.transpose(0, 1).to(query.dtype)
    return out


def varlen_attention_reference(
    query: torch.Tensor,  # [t, n, d]
    key: torch.Tensor,  # [t, g, d]
    value: torch.Tensor,  # [t, g, d]
    cu_seqlens: torch.Tensor,  # [b + 1] int
    softmax_scale: float,
    window_left: int | None = None,
) -> torch.Tensor:
    """Causal attention within each packed sequence, no cache: a whole-sequence forward."""
    t, n, d = query.shape
    g = key.shape[1]
    out = torch.empty_like(query)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        pos = torch.arange(end - start, device=query.device)
        o = F.scaled_dot_product_attention(
            query[start:end].transpose(0, 1).float(),  # [n, s, d]
            key[start:end].transpose(0, 1).float(),  # [g, s, d]
            value[start:end].transpose(0, 1).float(),
            attn_mask=_allowed(pos, pos, window_left),
            scale=softmax_scale,
            enable_gqa=n != g,
        )
        out[start:end] = o.transpose(0, 1).to(query.dtype)
    return out
