"""Inputs shared by the paged-attention kernel tests (Triton and native CPU): paged caches
with NaN traps, queries, and the case tables both kernels are checked on."""

from __future__ import annotations

import torch
from kernel_targets import Target

NAN = float("nan")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def paged_batch(seqs: list[tuple[int, int]], g: int, d: int, block_size: int, target: Target, gen: torch.Generator):
    """Caches and metadata for sequences given as (new tokens q_len, context length ctx).

    Returns k_cache, v_cache [num_blocks, block_size, g, d], cu_seqlens_q [b + 1],
    context_lens [b], block_tables [b, max_blocks] (int32, as InferenceParams holds them).
    """
    needed = [cdiv(ctx, block_size) for _, ctx in seqs]
    num_blocks = sum(needed) + 3  # three blocks nobody owns
    k_cache = target.randn(num_blocks, block_size, g, d, generator=gen)
    v_cache = target.randn(num_blocks, block_size, g, d, generator=gen)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    trap = order.pop()  # unused table entries point here
    tables = torch.full((len(seqs), max(needed) + 2), trap, dtype=torch.int32)
    owned = set()
    for i, ((_, ctx), count) in enumerate(zip(seqs, needed)):
        blocks = [order.pop() for _ in range(count)]
        owned.update(blocks)
        tables[i, :count] = torch.tensor(blocks, dtype=torch.int32)
        # Slots past the context in the last block:  [ ctx % block_size ... block_size )
        tail = ctx - (count - 1) * block_size
        k_cache[blocks[-1], tail:] = NAN
        v_cache[blocks[-1], tail:] = NAN
    for blk in set(range(num_blocks)) - owned:
        k_cache[blk] = NAN
        v_cache[blk] = NAN
    q_lens = torch.tensor([q for q, _ in seqs], dtype=torch.int32)
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = q_lens.cumsum(0)
    ctx_lens = torch.tensor([c for _, c in seqs], dtype=torch.int32)
    dev = target.device
    return k_cache, v_cache, cu.to(dev), ctx_lens.to(dev), tables.to(dev)


def queries(t: int, g: int, hpg: int, d: int, as_view: bool, target: Target, gen: torch.Generator):
    """[t, n, d] contiguous, or the grouped view [t, g, n/g, d] of a fused QKV tensor."""
    if as_view:
        return target.randn(t, g, hpg + 2, d, generator=gen)[:, :, :hpg]
    return target.randn(t, g * hpg, d, generator=gen)


# (sequences as (q_len, ctx), g, n/g, d, block size, window_left, query as a QKV view). Pairwise
# over GQA 1/2/3/4/5/8, d 64/80/128, block sizes 1..32, windows, prefixes, zero-length sequences.
PREFILL_CASES = {
    "fresh-gqa4": ([(17, 17), (5, 5), (33, 33)], 2, 4, 64, 16, None, True),
    "mixed-gqa8": ([(9, 40), (1, 23), (20, 20), (1, 1)], 1, 8, 128, 4, None, False),
    "gqa5-window": ([(12, 12), (3, 50)], 2, 5, 64, 8, 7, True),
    "mha-prefix": ([(30, 70), (7, 7)], 4, 1, 128, 16, None, True),
    "many-pages": ([(16, 300), (2, 2)], 1, 2, 64, 1, None, False),
    "window-mixed": ([(25, 60), (1, 9)], 2, 2, 128, 4, 10, True),
    "empty-seqs-d80": ([(0, 5), (8, 8), (0, 3), (2, 11)], 1, 4, 80, 16, None, False),
    "ragged-gqa3": ([(3, 3), (11, 30), (1, 64), (6, 6), (13, 13), (2, 100)], 2, 3, 64, 32, None, True),
}


# (context lengths, g, n/g, d, block size, window_left, num_splits; None: the launcher's choice).
# Splits that outnumber a short context's key tiles leave empty splits for the merge to ignore.
DECODE_CASES = {
    "gqa4": ([9, 70, 17], 2, 4, 64, 16, None, None),
    "gqa5-splits4": ([9, 70, 17], 2, 5, 128, 4, None, 4),
    "gqa8-many-pages-splits8": ([500, 3, 130], 1, 8, 128, 2, None, 8),
    "mha-window-splits3": ([40, 7, 90], 4, 1, 64, 8, 13, 3),
    "batch16-splits2": ([1, 5, 17, 33, 64, 65, 100, 2, 9, 31, 48, 77, 80, 96, 12, 3], 2, 2, 64, 8, None, 2),
    "ctx1-splits4": ([1, 1, 1], 2, 3, 64, 16, None, 4),
    "gqa8-window-splits4": ([200, 31], 1, 8, 64, 16, 30, 4),
}
