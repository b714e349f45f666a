"""Rotary position embedding on packed tokens.

Every token carries its own position id, so one call serves prefill, decode and mixed
batches alike. `cos`/`sin` come from a float32 cache indexed by position ([P, r/2], where r
is the rotary dimension: kv_channels * rotary_percent); dims past r pass through unrotated.

Two pairings, as Megatron-Core's `rotary_interleaved`:
  half (Llama):           (x[i], x[i + r/2]) is rotated by angle i
  interleaved (GPT-J):    (x[2i], x[2i + 1]) is rotated by angle i

`rope_reference` returns rotated copies of q and k; `rope_` (Triton) rotates them in place in
the fused QKV tensor, one launch for all query and key heads, so the model never splits q and
k out into copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tpserve.kernels import _launch as L


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    # x: [t, heads, d]; cos, sin: [t, 1, r/2] in float32
    r = 2 * cos.shape[-1]
    rot, rest = x[..., :r].float(), x[..., r:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., : r // 2], rot[..., r // 2 :]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if interleaved:
        rotated = torch.stack((y1, y2), dim=-1).flatten(-2)  # [t, heads, r], pairs side by side
    else:
        rotated = torch.cat((y1, y2), dim=-1)  # [t, heads, r]
    return torch.cat((rotated.to(x.dtype), rest), dim=-1)


def rope_reference(
    query: torch.Tensor,  # [t, n, d]
    key: torch.Tensor,  # [t, g, d]
    positions: torch.Tensor,  # [t] int
    cos_cache: torch.Tensor,  # [P, r/2] float32
    sin_cache: torch.Tensor,  # [P, r/2] float32
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of `query` and `key`."""
    cos = cos_cache[positions].unsqueeze(1)  # [t, 1, r/2]
    sin = sin_cache[positions].unsqueeze(1)
    return _rotate(query, cos, sin, interleaved), _rotate(key, cos, sin, interleaved)


# ---------------------------------------------------------------------------------------------
# Triton: rotate q and k in place, in the fused QKV tensor, in one launch.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rope_kernel(
    # The fused QKV output [t, g, n/g + 2, d], rotated in place; last dim contiguous.
    qkv_ptr,
    stride_t,
    stride_g,
    stride_h,
    # Positions [t] and the float32 tables [P, r/2] (row stride stride_p, contiguous rows).
    pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_p,
    # Sizes: tokens, and the heads that rotate: per group its n/g query heads and its key head.
    num_tokens,
    num_rot_heads,
    ROT_HEADS_PER_GROUP: tl.constexpr,  # n/g + 1
    HALF_R: tl.constexpr,  # r/2 pairs per head; dims >= r are never touched
    INTERLEAVED: tl.constexpr,  # pairs (2i, 2i+1) instead of (i, i + r/2)
    # Tile: BLOCK_T tokens x BLOCK_H heads x BLOCK_R pairs.
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH], over g * (n/g + 1)
    pairs = tl.arange(0, BLOCK_R)  # [BR]
    tok_ok = toks < num_tokens
    pair_ok = pairs < HALF_R

    # One cos/sin row per token, shared by all its heads.
    pos = tl.load(pos_ptr + toks, mask=tok_ok, other=0).to(tl.int64)
    table = pos[:, None] * stride_p + pairs[None, :]  # [BT, BR]
    cs_ok = tok_ok[:, None] & pair_ok[None, :]
    cos = tl.load(cos_ptr + table, mask=cs_ok, other=1.0)[:, None, :]  # [BT, 1, BR]
    sin = tl.load(sin_ptr + table, mask=cs_ok, other=0.0)[:, None, :]

    # Head h is head (h % (n/g + 1)) of group (h // (n/g + 1)): queries first, then the key.
    head_off = (heads // ROT_HEADS_PER_GROUP) * stride_g + (heads % ROT_HEADS_PER_GROUP) * stride_h  # [BH]
    base = toks.to(tl.int64)[:, None, None] * stride_t + head_off[None, :, None]  # [BT, BH, 1]
    if INTERLEAVED:
        off1 = 2 * pairs
        off2 = 2 * pairs + 1
    else:
        off1 = pairs
        off2 = pairs + HALF_R
    p1 = qkv_ptr + base + off1[None, None, :]  # [BT, BH, BR]
    p2 = qkv_ptr + base + off2[None, None, :]
    ok = tok_ok[:, None, None] & (heads < num_rot_heads)[None, :, None] & pair_ok[None, None, :]
    x1 = tl.load(p1, mask=ok, other=0.0)
    x2 = tl.load(p2, mask=ok, other=0.0)
    # Rotate in float32, round once, as the reference does.
    y1 = x1.to(tl.float32) * cos - x2.to(tl.float32) * sin
    y2 = x2.to(tl.float32) * cos + x1.to(tl.float32) * sin
    tl.store(p1, y1.to(x1.dtype), mask=ok)
    tl.store(p2, y2.to(x2.dtype), mask=ok)


def rope_(
    qkv: torch.Tensor,  # [t, g, n/g + 2, d], rotated in place
    positions: torch.Tensor,  # [t] int
    cos_cache: torch.Tensor,  # [P, r/2] float32
    sin_cache: torch.Tensor,  # [P, r/2] float32
    interleaved: bool,
) -> None:
    """Rotate every query and key head of the fused QKV tensor in place (values untouched).

    Grid: (cdiv(t, BLOCK_T), cdiv(g * (n/g + 1), BLOCK_H)); one program rotates BLOCK_T tokens
    x BLOCK_H heads. Positions are not bounds-checked against P (that would need a device sync).
    """
    L.check_shape("qkv", qkv, (None, None, None, None))
    t, g, hp2, d = qkv.shape
    half_r = cos_cache.shape[-1] if cos_cache.dim() == 2 else -1
    L.check_shape("cos_cache", cos_cache, (None, half_r))
    L.check_shape("sin_cache", sin_cache, tuple(cos_cache.shape))
    L.check_shape("positions", positions, (t,))
    if hp2 < 3:
        raise ValueError(f"qkv {list(qkv.shape)} needs at least one query head per group (dim 2 >= 3)")
    if not 0 < 2 * half_r <= d:
        raise ValueError(f"rotary dim 2 * {half_r} does not fit head dim {d}")
    L.check_dtype("qkv", qkv, L.FLOAT_DTYPES)
    L.check_dtype("cos_cache", cos_cache, (torch.float32,))
    L.check_dtype("sin_cache", sin_cache, (torch.float32,))
    L.check_dtype("positions", positions, L.INDEX_DTYPES)
    L.check_unit_last_stride(qkv=qkv, cos_cache=cos_cache, sin_cache=sin_cache)
    if sin_cache.stride() != cos_cache.stride():
        raise ValueError(f"cos_cache and sin_cache strides differ: {cos_cache.stride()} vs {sin_cache.stride()}")
    if positions.stride(0) != 1 and t > 1:
        raise ValueError("positions must be contiguous")
    device = L.check_same_device(qkv=qkv, positions=positions, cos_cache=cos_cache, sin_cache=sin_cache)
    L.check_runnable(_rope_kernel, device)
    if t == 0:
        return

    rot_heads = g * (hp2 - 1)
    block_r = L.next_pow2(half_r)
    block_h = min(L.next_pow2(rot_heads), 16)
    # Memory-bound: ~4k pairs per program on a GPU; the interpreter takes as many as it can.
    pairs_per_program = 1 << 16 if L.interpreting(device) else 4096
    block_t = min(L.next_pow2(t), max(1, pairs_per_program // (block_h * block_r)))
    grid = (L.cdiv(t, block_t), L.cdiv(rot_heads, block_h))
    _rope_kernel[grid](
        qkv, qkv.stride(0), qkv.stride(1), qkv.stride(2),
        positions, cos_cache, sin_cache, cos_cache.stride(0),
        t, rot_heads,
        ROT_HEADS_PER_GROUP=hp2 - 1, HALF_R=half_r, INTERLEAVED=interleaved,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_R=block_r,
        num_warps=4,
    )
