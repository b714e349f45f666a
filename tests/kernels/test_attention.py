"""Triton attention (`paged_attention`, `varlen_attention`) against the torch references.

Every case builds a paged cache whose blocks are handed out in a shuffled order; blocks no
sequence owns, unused block-table entries and the slots past each sequence's context in its
last block are NaN, and so is the output before the call. A kernel that reads a wrong block,
reads past a context, or leaves a row unwritten fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from kernel_targets import Target
from paged_inputs import DECODE_CASES, NAN, PREFILL_CASES, paged_batch, queries

from tpserve.kernels.attention import (
    paged_attention,
    paged_attention_reference,
    varlen_attention,
    varlen_attention_reference,
)

def check_paged(target, seqs, g, hpg, d, block_size, window, as_view=False, num_splits=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, cu, ctx_lens, tables = paged_batch(seqs, g, d, block_size, target, gen)
    t = sum(q for q, _ in seqs)
    q = queries(t, g, hpg, d, as_view, target, gen)
    scale = d**-0.5
    want = paged_attention_reference(q.reshape(t, g * hpg, d), k_cache, v_cache, cu, ctx_lens, tables, scale, window)
    out = torch.full((t, g * hpg, d), NAN, dtype=target.dtype, device=target.device)
    got = paged_attention(
        q, k_cache, v_cache, cu, ctx_lens, tables, scale, window,
        max_seqlen_q=max(q for q, _ in seqs), max_context_len=max(c for _, c in seqs),
        num_splits=num_splits, out=out,
    )
    assert got is out
    torch.testing.assert_close(got, want, rtol=target.rtol, atol=target.atol)


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_matches_reference(target: Target, case):
    seqs, g, hpg, d, block_size, window, as_view = PREFILL_CASES[case]
    check_paged(target, seqs, g, hpg, d, block_size, window, as_view, seed=len(case))


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_matches_reference(target: Target, case):
    ctxs, g, hpg, d, block_size, window, splits = DECODE_CASES[case]
    check_paged(target, [(1, c) for c in ctxs], g, hpg, d, block_size, window, as_view=True,
                num_splits=splits, seed=len(case))


def test_decode_with_a_sequence_that_has_no_new_token(target: Target):
    """A decode step where one sequence contributes no query (q_len 0): it is skipped."""
    check_paged(target, [(1, 5), (0, 7), (1, 1)], 1, 4, 64, 16, None, num_splits=2)


VARLEN_CASES = {
    "gqa4": ([17, 5, 33], 2, 4, 64, None),
    "gqa8-window": ([1, 40, 9], 1, 8, 128, 6),
    "gqa5": ([12, 12], 2, 5, 64, None),
    "mha-window-empty": ([30, 7, 0, 2], 4, 1, 128, 3),
}


@pytest.mark.parametrize("case", VARLEN_CASES)
def test_varlen_matches_reference(target: Target, case):
    """The whole-sequence forward (no cache): q, k, v are views of one fused QKV tensor."""
    lens, g, hpg, d, window = VARLEN_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    t = sum(lens)
    qkv = target.randn(t, g, hpg + 2, d, generator=gen)
    q, k, v = qkv[:, :, :hpg], qkv[:, :, hpg], qkv[:, :, hpg + 1]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=target.device)
    want = varlen_attention_reference(q.reshape(t, g * hpg, d), k, v, cu, d**-0.5, window)
    out = torch.full((t, g * hpg, d), NAN, dtype=target.dtype, device=target.device)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, d**-0.5, window, out=out), want,
                               rtol=target.rtol, atol=target.atol)


# Shapes too big for the interpreter: long contexts, big batches, the launcher's split choice.
LARGE_CASES = {
    "decode-b64-4k": ([(1, 4096 - 37 * i) for i in range(64)], 8, 4, 128, 16, None),
    "decode-b1-32k": ([(1, 32768)], 8, 8, 128, 16, None),
    "prefill-prefix-1k": ([(1024, 2048), (2048, 2048), (1, 3000)], 8, 4, 128, 16, None),
    "prefill-d64-window": ([(700, 900), (512, 512)], 16, 1, 64, 32, 256),
}


@pytest.mark.parametrize("case", LARGE_CASES)
def test_large_shapes_on_gpu(target: Target, case):
    if target.device == "cpu":
        pytest.skip("too big for the interpreter")
    seqs, g, hpg, d, block_size, window = LARGE_CASES[case]
    check_paged(target, seqs, g, hpg, d, block_size, window, as_view=True)


@pytest.mark.gpu
def test_decode_in_a_cuda_graph_without_host_sync(target: Target):
    """Captured once with a fixed num_splits, replayed after the metadata changed in place."""
    if target.device == "cpu":
        pytest.skip("CUDA graphs need a GPU")
    gen = torch.Generator().manual_seed(5)
    g, hpg, d, bs, b = 2, 4, 128, 16, 8
    k_cache, v_cache, cu, ctx_lens, tables = paged_batch([(1, 1000)] * b, g, d, bs, target, gen)
    q = target.randn(b, g * hpg, d, generator=gen)
    out = torch.empty_like(q)

    def step():
        paged_attention(q, k_cache, v_cache, cu, ctx_lens, tables, d**-0.5,
                        max_seqlen_q=1, max_context_len=1000, num_splits=8, out=out)

    torch.cuda.set_sync_debug_mode("error")  # any host sync inside the launch raises
    try:
        step()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for lens in ([1000] * b, [1, 17, 999, 500, 64, 65, 3, 1000]):
        ctx_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        want = paged_attention_reference(q, k_cache, v_cache, cu, ctx_lens, tables, d**-0.5)
        torch.testing.assert_close(out, want, rtol=target.rtol, atol=target.atol)


def test_launcher_refuses_bad_inputs(interpreter):
    gen = torch.Generator().manual_seed(0)
    target = Target("cpu", torch.float32, 0, 0)
    k_cache, v_cache, cu, ctx_lens, tables = paged_batch([(2, 5), (1, 3)], 2, 16, 4, target, gen)
    q = torch.zeros(3, 8, 16)
    kw = dict(max_seqlen_q=2, max_context_len=5)
    with pytest.raises(ValueError, match="query has 7 heads, not a multiple of the 2 key/value heads"):
        paged_attention(torch.zeros(3, 7, 16), k_cache, v_cache, cu, ctx_lens, tables, 1.0, **kw)
    with pytest.raises(ValueError, match="k_cache has dtype torch.float16, query has torch.float32"):
        paged_attention(q, k_cache.half(), v_cache.half(), cu, ctx_lens, tables, 1.0, **kw)
    with pytest.raises(ValueError, match=r"cu_seqlens_q has shape \[2\]; expected \[3\]"):
        paged_attention(q, k_cache, v_cache, cu[:2], ctx_lens, tables, 1.0, **kw)
    with pytest.raises(ValueError, match="block_tables has dtype torch.float32"):
        paged_attention(q, k_cache, v_cache, cu, ctx_lens, tables.float(), 1.0, **kw)
    with pytest.raises(ValueError, match=r"out has shape \[3, 8, 8\]"):
        paged_attention(q, k_cache, v_cache, cu, ctx_lens, tables, 1.0, out=torch.zeros(3, 8, 8), **kw)
    with pytest.raises(ValueError, match="max_seqlen_q=2 and max_context_len=1 do not fit together"):
        paged_attention(q, k_cache, v_cache, cu, ctx_lens, tables, 1.0, max_seqlen_q=2, max_context_len=1)
    with pytest.raises(ValueError, match="max_seqlen_q=0 with 3 query rows"):
        paged_attention(q, k_cache, v_cache, cu, ctx_lens, tables, 1.0, max_seqlen_q=0, max_context_len=5)
    with pytest.raises(ValueError, match="num_splits=0 must be >= 1"):
        paged_attention(q[:2], k_cache, v_cache, torch.tensor([0, 1, 2], dtype=torch.int32), ctx_lens, tables,
                        1.0, max_seqlen_q=1, max_context_len=5, num_splits=0)


@pytest.mark.parametrize("seed", range(6))
def test_random_batches(target: Target, seed):
    """Fresh random mixes: GQA, head dim, block size, window and a batch of prefills, prefill
    chunks and decodes (or decodes only, half the time, with random splits) drawn per seed."""
    rng = torch.Generator().manual_seed(100 + seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=rng))]

    g, hpg, d = pick([1, 2, 4]), pick([1, 4, 5, 8]), pick([64, 128])
    block_size, window = pick([1, 4, 16, 32]), pick([None, None, 5, 40])
    b = int(torch.randint(1, 7, (1,), generator=rng))
    decode_only = seed % 2 == 1
    seqs = []
    for _ in range(b):
        ctx = int(torch.randint(1, 120, (1,), generator=rng))
        q_len = 1 if decode_only else int(torch.randint(0, min(ctx, 24) + 1, (1,), generator=rng))
        seqs.append((q_len, ctx))
    if not decode_only and max(q for q, _ in seqs) < 2:
        seqs[0] = (2, max(2, seqs[0][1]))
    splits = pick([None, 2, 3, 8]) if decode_only else None
    check_paged(target, seqs, g, hpg, d, block_size, window, as_view=bool(seed % 3), num_splits=splits, seed=seed)
