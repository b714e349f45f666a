"""The native CPU attention kernel (`paged_attention_cpu`) against the torch reference.

Same traps as the Triton tests (paged_inputs.py): shuffled blocks, NaN in every slot no sequence
may read, NaN in the output before the call. Float32 on the CPU, where the C kernel runs
compiled (no interpreter), so the shapes can be larger than the Triton tests'.
"""

from __future__ import annotations

import pytest
import torch
from kernel_targets import Target
from paged_inputs import DECODE_CASES, NAN, PREFILL_CASES, paged_batch, queries

from tpserve.kernels import native
from tpserve.kernels.attention import paged_attention_reference
from tpserve.kernels.cpu_attention import paged_attention_cpu

CPU = Target("cpu", torch.float32, rtol=1e-4, atol=1e-5)
BF16_CACHE = Target("cpu", torch.bfloat16, rtol=1e-4, atol=1e-5)


def check(seqs, g, hpg, d, block_size, window, as_view=False, seed=0, cache=CPU):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, cu, ctx_lens, tables = paged_batch(seqs, g, d, block_size, cache, gen)
    t = sum(q for q, _ in seqs)
    q = queries(t, g, hpg, d, as_view, CPU, gen).reshape(t, g * hpg, d)
    scale = d**-0.5
    # A bf16 cache is widened exactly and all arithmetic is float32: the float32 tolerance holds.
    want = paged_attention_reference(q, k_cache.float(), v_cache.float(), cu, ctx_lens, tables, scale, window)
    out = torch.full((t, g * hpg, d), NAN)
    got = paged_attention_cpu(q, k_cache, v_cache, cu, ctx_lens, tables, scale, window, out=out)
    assert got is out
    torch.testing.assert_close(got, want, rtol=CPU.rtol, atol=CPU.atol)


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_and_mixed_steps(case):
    seqs, g, hpg, d, block_size, window, as_view = PREFILL_CASES[case]
    check(seqs, g, hpg, d, block_size, window, as_view, seed=len(case))


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode(case):
    ctxs, g, hpg, d, block_size, window, _ = DECODE_CASES[case]
    check([(1, c) for c in ctxs], g, hpg, d, block_size, window, as_view=True, seed=len(case))


# Shapes the C kernel treats apart: head dims without a specialised instance (8, 16, 96), more
# than 8 query heads per group (its value loop takes heads 8 at a time), SmolLM2's 3x64 at a
# serving batch, and a long prompt with a long cached prefix.
@pytest.mark.parametrize(
    "seqs, g, hpg, d, block_size, window",
    [
        ([(1, 40), (5, 9), (3, 3)], 2, 2, 8, 4, None),
        ([(7, 20), (1, 33)], 1, 3, 16, 16, 6),
        ([(4, 50), (1, 17)], 2, 12, 96, 8, None),
        ([(1, 30 + i) for i in range(64)], 3, 3, 64, 16, None),
        ([(300, 700), (1, 64)], 1, 4, 128, 16, None),
    ],
    ids=["d8", "d16-window", "gqa12-d96", "smollm2-batch64", "long-prompt"],
)
def test_shapes_with_their_own_code_paths(seqs, g, hpg, d, block_size, window):
    check(seqs, g, hpg, d, block_size, window, seed=7)


@pytest.mark.parametrize(
    "seqs, g, hpg, d, block_size, window",
    [
        ([(1, 40), (5, 9), (3, 3)], 2, 2, 8, 4, None),
        ([(4, 50), (1, 17)], 2, 12, 96, 8, 20),
        ([(1, 30 + i) for i in range(64)], 3, 3, 64, 16, None),
        ([(37, 200), (1, 64), (0, 5)], 2, 4, 128, 16, None),
    ],
    ids=["d8", "gqa12-d96-window", "smollm2-batch64", "prefill-d128"],
)
def test_a_bfloat16_cache(seqs, g, hpg, d, block_size, window):
    check(seqs, g, hpg, d, block_size, window, seed=11, cache=BF16_CACHE)


@pytest.mark.parametrize("seed", range(6))
def test_random_batches(seed):
    rng = torch.Generator().manual_seed(200 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    g, hpg, d = pick([1, 2, 3, 4]), pick([1, 3, 4, 5, 8]), pick([32, 64, 128])
    block_size, window = pick([1, 4, 16, 32]), pick([None, None, 5, 40])
    seqs = []
    for _ in range(int(torch.randint(1, 9, (1,), generator=rng))):
        ctx = int(torch.randint(1, 300, (1,), generator=rng))
        seqs.append((1 if seed % 2 else int(torch.randint(0, min(ctx, 40) + 1, (1,), generator=rng)), ctx))
    check(seqs, g, hpg, d, block_size, window, as_view=bool(seed % 3), seed=seed)


def test_refuses_bad_inputs():
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache, cu, ctx_lens, tables = paged_batch([(2, 5), (1, 3)], 2, 16, 4, CPU, gen)
    q = torch.zeros(3, 8, 16)
    with pytest.raises(ValueError, match="7 query heads do not divide into 2 kv heads"):
        paged_attention_cpu(torch.zeros(3, 7, 16), k_cache, v_cache, cu, ctx_lens, tables, 1.0)
    with pytest.raises(ValueError, match="head dim 12 is not a multiple of 8"):
        paged_attention_cpu(torch.zeros(3, 8, 12), k_cache[..., :12], v_cache[..., :12], cu, ctx_lens, tables, 1.0)
    with pytest.raises(ValueError, match="k_cache must be a float32 or bfloat16 CPU tensor, not torch.float16"):
        paged_attention_cpu(q, k_cache.half(), v_cache, cu, ctx_lens, tables, 1.0)
    with pytest.raises(ValueError, match="more queries than tokens in the cache"):
        paged_attention_cpu(q, k_cache, v_cache, cu, torch.tensor([1, 3], dtype=torch.int32), tables, 1.0)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0"):
        paged_attention_cpu(q, k_cache, v_cache, torch.tensor([0, 2, 4], dtype=torch.int32), ctx_lens, tables, 1.0)
    with pytest.raises(IndexError, match="not a block of the cache"):
        paged_attention_cpu(q, k_cache, v_cache, cu, ctx_lens, tables + k_cache.shape[0], 1.0)
    with pytest.raises(IndexError, match="not a block of the cache"):
        paged_attention_cpu(q, k_cache, v_cache, cu, ctx_lens, -tables - 1, 1.0)
    with pytest.raises(IndexError, match="past its table"):  # 5 tokens need 2 blocks of 4
        paged_attention_cpu(q, k_cache, v_cache, cu, ctx_lens, tables[:, :1], 1.0)


def test_loading_the_kernels_leaves_denormals_alone():
    """Linked with -ffast-math, a library would switch the loading thread to flush-to-zero:
    Python then parsed a request's top_p=5e-324 as 0.0 and a worker died on it."""
    native.library()
    assert float("5e-324") > 0.0
    assert (torch.tensor([1e-39]) * 0.5).item() > 0.0


def test_a_window_wider_than_int32_is_no_window():
    """The kernel takes an int32 window: a wider one (a config may hold any) must mean 'none',
    not wrap around to a small or negative one."""
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, cu, ctx_lens, tables = paged_batch([(3, 900), (1, 40)], 1, 64, 16, CPU, gen)
    q = torch.randn(4, 8, 64, generator=gen)
    want = paged_attention_reference(q, k_cache, v_cache, cu, ctx_lens, tables, 0.125)
    for window in (2**31 - 1, 2**32 + 100):
        got = paged_attention_cpu(q, k_cache, v_cache, cu, ctx_lens, tables, 0.125, window)
        torch.testing.assert_close(got, want, rtol=CPU.rtol, atol=CPU.atol)


def test_empty_blocks_or_heads_are_refused():
    q = torch.zeros(1, 2, 8)
    one = torch.tensor([0, 1], dtype=torch.int32)
    for shape in ((4, 0, 2, 8), (4, 4, 2, 0)):
        cache = torch.zeros(shape)
        with pytest.raises(ValueError, match="blocks and heads must not be empty"):
            paged_attention_cpu(q[..., : shape[3]], cache, cache, one, one, torch.zeros(1, 1, dtype=torch.int32), 1.0)
