"""Causal attention of packed ("thd") queries over keys and values in a paged KV cache.

One function covers prefill, decode, chunked prefill with a cached prefix, and any mix of
them in one batch. Sequence i contributes q_len_i = cu_seqlens_q[i+1] - cu_seqlens_q[i]
queries, which are the *last* q_len_i of its context_len_i tokens (already stored in the cache):

    positions:  0 ...................... context_len - q_len ........ context_len - 1
    cache:      [ cached prefix (earlier steps) | this step's tokens (just stored) ]
    queries:                                     ^ one per token of this step

Query j (position p = context_len - q_len + j) attends to keys at positions k with k <= p,
and p - k <= window_left when a sliding window is set.

This file holds the torch reference the Triton kernels (and the native CPU kernel,
kernels/cpu_attention.py) are tested against; it is also what the torch backend runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tpserve.kernels import _launch as L


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


def paged_decode_attention_torch(
    query: torch.Tensor,  # [b, n, d]: one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, g, d]
    v_cache: torch.Tensor,  # [num_blocks, block_size, g, d]
    context_lens: torch.Tensor,  # [b] int
    block_tables: torch.Tensor,  # [b, max_blocks] int
    softmax_scale: float,
    max_context_len: int,
    window_left: int | None = None,
) -> torch.Tensor:
    """A decode step of `paged_attention_reference`, batched: what the torch backend runs.

    The reference loops over sequences (one small attention each, per layer); here each
    sequence's blocks are gathered into one padded [b, L, g, d] tensor (L = max_context_len
    rounded up to a block) and one masked attention covers the batch.
    """
    b, n, d = query.shape
    block_size, g = k_cache.shape[1], k_cache.shape[2]
    num_blocks = -(-max_context_len // block_size)
    # index_select of whole blocks: ~3x faster on the CPU than advanced indexing k_cache[blocks]
    blocks = block_tables[:, :num_blocks].reshape(-1).long()  # [b * nb]
    k = k_cache.index_select(0, blocks).view(b, num_blocks * block_size, g, d)  # [b, L, g, d], a gathered copy
    v = v_cache.index_select(0, blocks).view(b, num_blocks * block_size, g, d)
    k_pos = torch.arange(num_blocks * block_size, device=query.device)
    last = (context_lens - 1).long()[:, None]  # the query's position
    mask = k_pos[None, :] <= last  # [b, L]: past the context are other sequences' or stale slots
    if window_left is not None and window_left >= 0:
        mask &= k_pos[None, :] >= last - window_left
    out = F.scaled_dot_product_attention(
        query[:, :, None].float(),  # [b, n, 1, d]
        k.transpose(1, 2).float(),  # [b, g, L, d]
        v.transpose(1, 2).float(),
        attn_mask=mask[:, None, None, :],  # [b, 1, 1, L]
        scale=softmax_scale,
        enable_gqa=n != g,
    )  # [b, n, 1, d]
    return out[:, :, 0].to(query.dtype)


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


# ---------------------------------------------------------------------------------------------
# Triton. Two kernels share the inner loop (online softmax over key tiles, fp32 accumulators):
#
#   _prefill_kernel  query tiles x key tiles, causal; any mix of prefill, prefill chunks over a
#                    cached prefix, and decode rows. Also serves the no-cache whole-sequence
#                    forward (PAGED=False: keys and values read from the packed tensors).
#   _decode_kernel   one query per sequence; its keys are cut into `num_splits` slices, one per
#                    program (flash-decoding), merged by _merge_splits_kernel, so a long context
#                    at a small batch still fills the GPU.
#
# GQA: a program owns one key/value head and all n/g query heads of its group. The rows of its
# query tile are (token, head) pairs, so each K/V tile is loaded once for the whole group:
#
#     row r  ->  token  q_tile * BLOCK_Q + r // (n/g),  head  kv_head * (n/g) + r % (n/g)
# ---------------------------------------------------------------------------------------------
LOG2E = 1.4426950408889634
# Initial running max: finite, so a row whose first tiles are all masked gives exp2(-inf - m) = 0
# and alpha = 1 instead of NaN.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _find_seq(cu_seqlens_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence that query tile `tile` belongs to, by binary search, without a host sync.

    Sequence i's tiles start at cu_seqlens[i] // BLOCK_Q + i. That start grows by at least
    cdiv(q_len_i, BLOCK_Q) from i to i + 1, so tiles never overlap; a tile past the end of its
    sequence (at most one per sequence) finds no queries and exits. Grid size t // BLOCK_Q + b.
    """
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        start = tl.load(cu_seqlens_ptr + mid) // BLOCK_Q + mid
        if start <= tile:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _kv_rows(table_ptr, k_pos, k_ok, seq_row0, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Row of each key position: in the cache viewed as [num_blocks * block_size, g, d] (through
    this sequence's block table), or in the packed keys (seq_row0 = the sequence's first row)."""
    if PAGED:
        block = tl.load(table_ptr + k_pos // PAGE, mask=k_ok, other=0).to(tl.int64)
        return block * PAGE + k_pos % PAGE
    else:
        return seq_row0 + k_pos.to(tl.int64)


@triton.jit
def _softmax_step(acc, m_i, l_i, s, v):
    """One key tile of online softmax. s: [M, N] scores in log2 units (-inf where masked);
    v: [N, D]. acc [M, D], m_i, l_i [M] are float32."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    # Queries [t, g, n/g, d] (a view of the fused QKV, or of [t, n, d]); output [t, n, d].
    q_ptr,
    stride_qt,
    stride_qg,
    stride_qh,
    o_ptr,
    stride_ot,
    stride_oh,
    # Keys, values: PAGED, caches seen as rows [num_blocks * block_size, g, d]; else packed [t, g, d].
    k_ptr,
    v_ptr,
    stride_kt,
    stride_kg,
    stride_vt,
    stride_vg,
    # Sequences: [b + 1] query offsets; PAGED: [b] context lengths, [b, max_blocks] block tables.
    cu_seqlens_ptr,
    context_lens_ptr,
    block_tables_ptr,
    stride_bt,
    num_seqs,
    # softmax_scale * log2(e): scores are kept in log2 units for exp2.
    qk_scale,
    window_left,
    HEADS_PER_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,  # cache block size (PAGED)
    PAGED: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    # Tile: BLOCK_M rows = BLOCK_Q tokens x n/g heads (padded), BLOCK_N keys, BLOCK_D dims.
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq(cu_seqlens_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    q_tile = tile - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    if PAGED:
        ctx = tl.load(context_lens_ptr + seq)
    else:
        ctx = q_len
    # This sequence's queries are its last q_len positions (see the picture at the top).
    prefix = ctx - q_len

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // HEADS_PER_GROUP  # query within the sequence
    head = rows % HEADS_PER_GROUP  # query head within the group
    row_ok = (rows < BLOCK_Q * HEADS_PER_GROUP) & (q_idx < q_len)
    q_pos = prefix + q_idx  # [M] position of each row's query
    tok = (q_start + q_idx).to(tl.int64)  # [M] packed row
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + kv_head * stride_qg + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [M, D]

    # Keys this tile may see: up to its last query's position; from the window's left edge.
    first_pos = prefix + q_tile * BLOCK_Q
    kv_end = prefix + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q)
    kv_start = 0
    if USE_WINDOW:
        # From the window's left edge for the tile's first query; every tile is masked.
        kv_start = tl.maximum(first_pos - window_left, 0) // BLOCK_N * BLOCK_N
        unmasked_end = kv_start
    else:
        # Keys before first_pos are visible to every row of the tile: no mask needed there.
        unmasked_end = first_pos // BLOCK_N * BLOCK_N

    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_ptr + kv_head * stride_kg
    v_base = v_ptr + kv_head * stride_vg
    m_i = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Tiles wholly before the diagonal: every key visible to every query.
    for n_start in range(kv_start, unmasked_end, BLOCK_N):
        k_pos = n_start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < kv_end
        kv_row = _kv_rows(table_ptr, k_pos, k_ok, q_start, PAGED, PAGE)
        k = tl.load(k_base + kv_row[None, :] * stride_kt + dims[:, None], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        v = tl.load(v_base + kv_row[:, None] * stride_vt + dims[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, k) * qk_scale  # [M, N]
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v)

    # Tiles on the diagonal (and inside a sliding window): causal and window masks.
    for n_start in range(unmasked_end, kv_end, BLOCK_N):
        k_pos = n_start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < kv_end
        kv_row = _kv_rows(table_ptr, k_pos, k_ok, q_start, PAGED, PAGE)
        k = tl.load(k_base + kv_row[None, :] * stride_kt + dims[:, None], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        v = tl.load(v_base + kv_row[:, None] * stride_vt + dims[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, k) * qk_scale
        seen = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
        if USE_WINDOW:
            seen &= (q_pos[:, None] - k_pos[None, :]) <= window_left
        s = tl.where(seen, s, float("-inf"))
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_head = kv_head * HEADS_PER_GROUP + head
    tl.store(
        o_ptr + tok[:, None] * stride_ot + o_head[:, None] * stride_oh + dims[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _decode_kernel(
    # Queries [t, g, n/g, d]; one row per sequence (or none: a sequence with no new token).
    q_ptr,
    stride_qt,
    stride_qg,
    stride_qh,
    # Caches as rows [num_blocks * block_size, g, d].
    k_ptr,
    v_ptr,
    stride_kt,
    stride_kg,
    stride_vt,
    stride_vg,
    # Sequences: [b + 1] query offsets, [b] context lengths, [b, max_blocks] block tables.
    cu_seqlens_ptr,
    context_lens_ptr,
    block_tables_ptr,
    stride_bt,
    # NUM_SPLITS == 1: the output [t, n, d]. Else each split's normalised output and log2-sum-exp:
    # part_o [b, n, num_splits, d], part_lse [b, n, num_splits], float32, contiguous.
    o_ptr,
    stride_ot,
    stride_oh,
    part_o_ptr,
    part_lse_ptr,
    num_heads,
    qk_scale,
    window_left,
    NUM_SPLITS: tl.constexpr,
    HEADS_PER_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    # Tile: BLOCK_H rows (the group's query heads, padded to >= 16 for tl.dot on a GPU).
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    if tl.load(cu_seqlens_ptr + seq + 1) == q_start:
        return
    ctx = tl.load(context_lens_ptr + seq)
    # Keys [lo, ctx) are visible to the query at position ctx - 1; this split takes its slice of
    # them, sized from this sequence's own length (whole tiles), so a fixed grid (a CUDA graph)
    # serves any context length: splits past the end just record "empty".
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx - 1 - window_left, 0)
    split_len = tl.cdiv(tl.cdiv(ctx - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * split_len
    end = tl.minimum(start + split_len, ctx)

    rows = tl.arange(0, BLOCK_H)
    row_ok = rows < HEADS_PER_GROUP
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + q_start.to(tl.int64) * stride_qt + kv_head * stride_qg + rows[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [H, D]

    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_ptr + kv_head * stride_kg
    v_base = v_ptr + kv_head * stride_vg
    m_i = tl.full([BLOCK_H], NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n_start in range(start, end, BLOCK_N):
        k_pos = n_start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < end
        kv_row = _kv_rows(table_ptr, k_pos, k_ok, 0, True, PAGE)
        k = tl.load(k_base + kv_row[None, :] * stride_kt + dims[:, None], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        v = tl.load(v_base + kv_row[:, None] * stride_vt + dims[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.where(k_ok[None, :], tl.dot(q, k) * qk_scale, float("-inf"))  # [H, N]
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, s, v)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_head = kv_head * HEADS_PER_GROUP + rows
    if NUM_SPLITS == 1:
        tl.store(
            o_ptr + q_start.to(tl.int64) * stride_ot + o_head[:, None] * stride_oh + dims[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        part = (seq.to(tl.int64) * num_heads + o_head) * NUM_SPLITS + split  # [H] row of part_lse
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))  # empty split: weight 0
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits_kernel(
    # Inputs from _decode_kernel: part_o [b, n, S, d], part_lse [b, n, S] (log2 units).
    part_o_ptr,
    part_lse_ptr,
    # Output [t, n, d]; sequence i's query is row cu_seqlens[i].
    o_ptr,
    stride_ot,
    stride_oh,
    cu_seqlens_ptr,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = sum_s w_s * o_s / sum_s w_s with w_s = 2^(lse_s - max lse): softmax over all keys."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    q_start = tl.load(cu_seqlens_ptr + seq)
    if tl.load(cu_seqlens_ptr + seq + 1) == q_start:
        return
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    s_ok = splits < NUM_SPLITS
    part = (seq.to(tl.int64) * num_heads + head) * NUM_SPLITS + splits  # [S]
    lse = tl.load(part_lse_ptr + part, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # [S]; split 0 is never empty, so the max is finite
    o = tl.load(part_o_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=s_ok[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.sum(w, 0)  # [D]
    tl.store(
        o_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + dims,
        out.to(o_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


# ---------------------------------------------------------------------------------------------
# Launchers.
# ---------------------------------------------------------------------------------------------
# A decode split gets at least this many keys: fewer and the merge costs more than it saves.
MIN_SPLIT_KEYS = 128
MAX_SPLITS = 64


def _prefill_config(device: torch.device, d: int, heads_per_group: int, dtype: torch.dtype) -> dict:
    """Block sizes of _prefill_kernel. GPU: the Triton flash-attention tutorial's tiles for
    H100-class parts, with 8 warps because the paged gather's per-element pointers cost registers
    (with 4, ptxas spills at d=64 and d=128 for sm_90); to be tuned with benchmarks/kernel_speed.py.
    Interpreter: big tiles, few programs."""
    if L.interpreting(device):
        block_m, block_n, warps, stages = 64, 64, 4, 1
    elif d <= 128:
        block_m, block_n, warps, stages = 128, 64, 8, 3
    else:
        block_m, block_n, warps, stages = 64, 32, 4, 2
    if dtype == torch.float32 and not L.interpreting(device):
        # fp32 tiles take twice the shared memory: 3 stages of 64-key tiles at d=128 need
        # ~256 KiB, more than an H100 has (227 KiB).
        block_n, stages = max(16, block_n // 2), 2
    block_m = max(block_m, L.next_pow2(heads_per_group))  # at least one token per tile
    block_d = L.next_pow2(d) if L.interpreting(device) else max(16, L.next_pow2(d))
    return dict(BLOCK_M=block_m, BLOCK_Q=block_m // heads_per_group, BLOCK_N=block_n, BLOCK_D=block_d,
                num_warps=warps, num_stages=stages)


def _decode_config(device: torch.device, d: int, heads_per_group: int) -> dict:
    if L.interpreting(device):
        return dict(BLOCK_H=L.next_pow2(heads_per_group), BLOCK_N=128, BLOCK_D=L.next_pow2(d),
                    num_warps=4, num_stages=1)
    # 8 warps: with 4, the [d, 64] gathered K tile's pointers push ptxas to 255 registers and
    # spills at d=128 (sm_90); with 8, 213 registers and none.
    return dict(BLOCK_H=max(16, L.next_pow2(heads_per_group)), BLOCK_N=64 if d <= 128 else 32,
                BLOCK_D=max(16, L.next_pow2(d)), num_warps=8, num_stages=2)


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Splits per (sequence, kv head) so a decode launch has about two programs per SM, each
    with >= MIN_SPLIT_KEYS keys. A power of two (it is a compile-time constant). One in the
    interpreter, where programs are what costs."""
    if L.interpreting(device):
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = L.cdiv(2 * sms, max(1, num_seqs * num_kv_heads))
    most = max(1, min(MAX_SPLITS, max_context_len // MIN_SPLIT_KEYS))
    splits = L.next_pow2(want)
    while splits > most:
        splits //= 2
    return splits


def _grouped_query(query: torch.Tensor, g: int) -> torch.Tensor:
    """[t, n, d] -> the view [t, g, n/g, d]; a [t, g, n/g, d] query passes through."""
    if query.dim() == 3:
        t, n, d = query.shape
        if n % g:
            raise ValueError(f"query has {n} heads, not a multiple of the {g} key/value heads")
        return query.unflatten(1, (g, n // g))  # [t, g, n/g, d]
    L.check_shape("query", query, (None, g, None, None))
    return query


def _output(out: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
    t, g, hpg, d = query.shape
    if out is None:
        return torch.empty(t, g * hpg, d, dtype=query.dtype, device=query.device)
    L.check_shape("out", out, (t, g * hpg, d))
    if out.dtype != query.dtype:
        raise ValueError(f"out has dtype {out.dtype}, query has {query.dtype}")
    L.check_unit_last_stride(out=out)
    return out


def _check_seqs(cu_seqlens: torch.Tensor, b: int, **per_seq: torch.Tensor) -> None:
    L.check_shape("cu_seqlens_q", cu_seqlens, (b + 1,))
    for name, x in {"cu_seqlens_q": cu_seqlens, **per_seq}.items():
        L.check_dtype(name, x, L.INDEX_DTYPES)
        if x.numel() > 1 and x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


def _window(window_left: int | None) -> tuple[bool, int]:
    use = window_left is not None and window_left >= 0
    return use, window_left if use else 0


def paged_attention(
    query: torch.Tensor,  # [t, n, d], or the grouped view [t, g, n/g, d] of the fused QKV
    k_cache: torch.Tensor,  # [num_blocks, block_size, g, d]
    v_cache: torch.Tensor,  # [num_blocks, block_size, g, d]
    cu_seqlens_q: torch.Tensor,  # [b + 1] int
    context_lens: torch.Tensor,  # [b] int
    block_tables: torch.Tensor,  # [b, max_blocks] int
    softmax_scale: float,
    window_left: int | None = None,
    *,
    max_seqlen_q: int,  # host-side maximum query length (PackedSeqParams.max_seqlen_q)
    max_context_len: int,  # host-side maximum context length (InferenceParams.max_context_len)
    num_splits: int | None = None,  # decode only; pass a fixed one when capturing a CUDA graph
    out: torch.Tensor | None = None,  # [t, n, d]
) -> torch.Tensor:
    """Triton `paged_attention_reference`: same semantics, output [t, n, d].

    One entry point, two kernels, chosen on the host from `max_seqlen_q` (no device sync):
    a step of decodes only (max_seqlen_q == 1) is memory-bound and, at small batch, too few
    (sequence, head) pairs to fill the GPU, so it runs the split-K decode kernel; any step with a
    longer query is compute-bound and runs the tiled prefill kernel, which serves the decode rows
    of a mixed step too. `max_seqlen_q` must be the true maximum: a decode launch reads one
    query per sequence.
    """
    L.check_shape("k_cache", k_cache, (None, None, None, None))
    _, page, g, d = k_cache.shape
    query = _grouped_query(query, g)
    t, _, hpg, _ = query.shape
    L.check_shape("query", query, (t, g, hpg, d))
    L.check_shape("v_cache", v_cache, tuple(k_cache.shape))
    b = context_lens.shape[0] if context_lens.dim() == 1 else -1
    L.check_shape("context_lens", context_lens, (b,))
    L.check_shape("block_tables", block_tables, (b, None))
    _check_seqs(cu_seqlens_q, b, context_lens=context_lens, block_tables=block_tables)
    L.check_dtype("query", query, L.FLOAT_DTYPES)
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != query.dtype:
            raise ValueError(f"{name} has dtype {x.dtype}, query has {query.dtype}")
    L.check_unit_last_stride(query=query)
    L.check_paged_cache("k_cache", k_cache)
    L.check_paged_cache("v_cache", v_cache)
    device = L.check_same_device(query=query, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu_seqlens_q,
                                 context_lens=context_lens, block_tables=block_tables)
    out = _output(out, query)
    if max_seqlen_q < 0 or max_context_len < max_seqlen_q:
        raise ValueError(f"max_seqlen_q={max_seqlen_q} and max_context_len={max_context_len} do not fit together")
    if max_seqlen_q == 0 and t > 0:
        raise ValueError(f"max_seqlen_q=0 with {t} query rows; pass the host-side maximum (PackedSeqParams.max_seqlen_q)")
    if b == 0 or t == 0 or max_seqlen_q == 0:
        return out
    use_window, window = _window(window_left)
    qk_scale = softmax_scale * LOG2E
    seqs = (cu_seqlens_q, context_lens, block_tables, block_tables.stride(0))
    kv = (k_cache, v_cache, k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2))

    if max_seqlen_q > 1:
        L.check_runnable(_prefill_kernel, device)
        cfg = _prefill_config(device, d, hpg, query.dtype)
        # Grid: (query tiles of all sequences, as _find_seq numbers them; kv heads).
        grid = (t // cfg["BLOCK_Q"] + b, g)
        _prefill_kernel[grid](
            query, *query.stride()[:3], out, out.stride(0), out.stride(1),
            *kv, *seqs, b, qk_scale, window,
            HEADS_PER_GROUP=hpg, HEAD_DIM=d, PAGE=page, PAGED=True, USE_WINDOW=use_window, **cfg,
        )
        return out

    L.check_runnable(_decode_kernel, device)
    if num_splits is None:
        num_splits = decode_num_splits(b, g, max_context_len, device)
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits} must be >= 1")
    cfg = _decode_config(device, d, hpg)
    n = g * hpg
    if num_splits == 1:
        part_o = part_lse = out  # unused
    else:
        part_o = torch.empty(b, n, num_splits, d, dtype=torch.float32, device=device)
        part_lse = torch.empty(b, n, num_splits, dtype=torch.float32, device=device)
    # Grid: (sequences, kv heads, splits of each sequence's keys).
    _decode_kernel[(b, g, num_splits)](
        query, *query.stride()[:3], *kv, *seqs,
        out, out.stride(0), out.stride(1), part_o, part_lse, n, qk_scale, window,
        NUM_SPLITS=num_splits, HEADS_PER_GROUP=hpg, HEAD_DIM=d, PAGE=page, USE_WINDOW=use_window, **cfg,
    )
    if num_splits > 1:
        # Grid: (sequences, query heads).
        _merge_splits_kernel[(b, n)](
            part_o, part_lse, out, out.stride(0), out.stride(1), cu_seqlens_q,
            NUM_SPLITS=num_splits, HEAD_DIM=d, BLOCK_S=L.next_pow2(num_splits), BLOCK_D=L.next_pow2(d),
            num_warps=4,
        )
    return out


def varlen_attention(
    query: torch.Tensor,  # [t, n, d] or [t, g, n/g, d]
    key: torch.Tensor,  # [t, g, d]
    value: torch.Tensor,  # [t, g, d]
    cu_seqlens: torch.Tensor,  # [b + 1] int
    softmax_scale: float,
    window_left: int | None = None,
    *,
    out: torch.Tensor | None = None,  # [t, n, d]
) -> torch.Tensor:
    """Triton `varlen_attention_reference` (whole-sequence forward, no cache): the prefill
    kernel reading keys and values from the packed tensors instead of the paged cache.
    Grid: (t // BLOCK_Q + b, g)."""
    L.check_shape("key", key, (None, None, None))
    t, g, d = key.shape
    query = _grouped_query(query, g)
    hpg = query.shape[2]
    L.check_shape("query", query, (t, g, hpg, d))
    L.check_shape("value", value, (t, g, d))
    b = cu_seqlens.shape[0] - 1 if cu_seqlens.dim() == 1 else -1
    _check_seqs(cu_seqlens, b)
    L.check_dtype("query", query, L.FLOAT_DTYPES)
    for name, x in (("key", key), ("value", value)):
        if x.dtype != query.dtype:
            raise ValueError(f"{name} has dtype {x.dtype}, query has {query.dtype}")
    L.check_unit_last_stride(query=query, key=key, value=value)
    device = L.check_same_device(query=query, key=key, value=value, cu_seqlens=cu_seqlens)
    out = _output(out, query)
    if b <= 0 or t == 0:
        return out
    L.check_runnable(_prefill_kernel, device)
    use_window, window = _window(window_left)
    cfg = _prefill_config(device, d, hpg, query.dtype)
    grid = (t // cfg["BLOCK_Q"] + b, g)
    _prefill_kernel[grid](
        query, *query.stride()[:3], out, out.stride(0), out.stride(1),
        key, value, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cu_seqlens, cu_seqlens, cu_seqlens, 0, b,  # no context lengths or block tables: unused
        softmax_scale * LOG2E, window,
        HEADS_PER_GROUP=hpg, HEAD_DIM=d, PAGE=1, PAGED=False, USE_WINDOW=use_window, **cfg,
    )
    return out
