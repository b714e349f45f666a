"""Sampler: truncation and repetition penalty equal Hugging Face's processors; penalties, bias
and the min_tokens ban equal a per-row Python reference; seeded draws are stateless, exact in
distribution, and the same in any batch."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tpserve.engine.sampler import (
    Sampler,
    SamplingBatch,
    SamplingRow,
    hash32,
    noise_key,
    sample_gumbel,
)
from tpserve.engine.sampling_params import SamplingParams

INF = float("inf")


def build(params, vocab_size, outputs=None, prompts=None, seeds=None, indices=None, eos=()):
    """One row per SamplingParams; outputs/prompts default to empty, seeds to 1234."""
    b = len(params)
    outputs = outputs or [[] for _ in range(b)]
    prompts = prompts or [[] for _ in range(b)]
    seeds = seeds or [1234] * b
    indices = indices or [0] * b
    rows = [SamplingRow(p, prompts[r], outputs[r], seeds[r], indices[r], len(outputs[r])) for r, p in enumerate(params)]
    return SamplingBatch.build(rows, vocab_size, list(eos), "cpu")


def processed_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """What a sampled row draws from (softmax of it is its distribution), through the sampler's
    own two stages, as `Sampler.__call__` applies them."""
    return Sampler.truncate(Sampler.penalize(logits, batch) / batch.temperature[:, None], batch)


def hf_process(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """HF's warpers in generate()'s order on one row [V] -> [V]."""
    scores = row[None].clone()
    ids = torch.zeros(1, 0, dtype=torch.long)
    if p.temperature not in (0.0, 1.0):
        scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p > 0.0:
        scores = MinPLogitsWarper(p.min_p)(ids, scores)
    return scores[0]


def assert_same_as_hf(logits, params):
    processed = processed_logits(logits, build(params, logits.shape[1]))
    for r, p in enumerate(params):
        expected = hf_process(logits[r], p)
        assert torch.equal(torch.isfinite(processed[r]), torch.isfinite(expected)), f"row {r}: {p}"
        assert torch.equal(processed[r], expected), f"row {r}: {p}"


# --- Hugging Face equivalence ---


def test_top_k_matches_hf():
    torch.manual_seed(0)
    V = 300
    ks = [1, 2, 7, 50, 299, 300, 301, 0, -1]  # 300 = V and 301 > V keep all; 0 and -1 are off
    logits = torch.randn(len(ks), V) * 3
    assert_same_as_hf(logits, [SamplingParams(top_k=k, temperature=0.8) for k in ks])


def test_top_p_matches_hf():
    torch.manual_seed(1)
    V = 300
    # (top_p, temperature); top_p = 1 at a low temperature: off, even for tokens whose
    # probability underflows to 0 (a cutoff of 0 would remove those).
    settings = [(0.05, 1.0), (0.3, 0.5), (0.5, 1.0), (0.9, 1.3), (0.99, 0.7), (1.0, 1.0), (0.95, 2.0), (1.0, 0.05)]
    logits = torch.randn(len(settings), V) * 4
    assert_same_as_hf(logits, [SamplingParams(top_p=p, temperature=t) for p, t in settings])


def test_min_p_matches_hf():
    torch.manual_seed(2)
    V = 300
    min_ps = [0.0, 0.01, 0.05, 0.2, 0.5, 0.9, 1.0]
    logits = torch.randn(len(min_ps), V) * 3
    assert_same_as_hf(logits, [SamplingParams(min_p=m, temperature=0.9) for m in min_ps])


def test_top_k_top_p_min_p_together_match_hf():
    """Random settings per row, all three in one batch (the sorted path), 24 rows."""
    rng = random.Random(3)
    torch.manual_seed(3)
    V = 500
    params = [
        SamplingParams(
            temperature=rng.choice([0.3, 0.7, 1.0, 1.5]),
            top_k=rng.choice([0, 1, 5, 40, 200, 600]),
            top_p=rng.choice([0.2, 0.6, 0.9, 1.0]),
            min_p=rng.choice([0.0, 0.02, 0.1]),
        )
        for _ in range(24)
    ]
    logits = torch.randn(len(params), V) * 2.5
    assert_same_as_hf(logits, params)


def test_repetition_penalty_matches_hf():
    torch.manual_seed(4)
    V = 200
    penalties = [1.0, 1.1, 1.5, 0.8, 2.0]
    prompts = [torch.randint(0, V, (n,)).tolist() for n in (5, 30, 1, 12, 40)]
    outputs = [torch.randint(0, V, (n,)).tolist() for n in (3, 0, 10, 7, 25)]  # repeats included
    logits = torch.randn(len(penalties), V) * 3
    batch = build([SamplingParams(repetition_penalty=rp) for rp in penalties], V, outputs, prompts)
    processed = processed_logits(logits, batch)
    for r, rp in enumerate(penalties):
        input_ids = torch.tensor([prompts[r] + outputs[r]])
        expected = RepetitionPenaltyLogitsProcessor(rp)(input_ids, logits[r][None].clone())[0]
        assert torch.equal(processed[r], expected), f"row {r}: penalty {rp}"


# --- per-row Python references ---


def test_presence_frequency_penalties_and_logit_bias_match_reference():
    torch.manual_seed(5)
    V = 50
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(presence_penalty=-1.0, logit_bias={3: 5.0, 7: -100.0}),
        SamplingParams(frequency_penalty=2.0, logit_bias={"49": 1.5}),  # JSON-style key
        SamplingParams(),
    ]
    prompts = [[1, 2, 3], [3, 3], [9], [4]]  # prompts never count for presence/frequency
    outputs = [[4, 4, 4, 5], [3, 8, 8], [49, 1, 1], [4, 4]]
    logits = torch.randn(len(params), V)
    got = processed_logits(logits, build(params, V, outputs, prompts))
    for r, p in enumerate(params):
        expected = logits[r].tolist()
        for token_id, bias in (p.logit_bias or {}).items():
            expected[token_id] += bias
        for token_id in set(outputs[r]):
            count = outputs[r].count(token_id)
            expected[token_id] -= count * p.frequency_penalty + p.presence_penalty
        torch.testing.assert_close(got[r], torch.tensor(expected), rtol=0, atol=1e-6)


def test_min_tokens_bans_eos_and_stop_ids():
    V, eos = 20, [2, 3]
    params = [
        SamplingParams(min_tokens=3, stop_token_ids=[7]),  # 2 outputs: banned
        SamplingParams(min_tokens=3, stop_token_ids=[7], ignore_eos=True),  # stop ids only
        SamplingParams(min_tokens=2, stop_token_ids=[7]),  # 2 outputs: free again
        SamplingParams(min_tokens=3, logit_bias={2: 100.0}),  # a bias cannot lift the ban
    ]
    logits = torch.zeros(len(params), V)
    got = processed_logits(logits, build(params, V, outputs=[[5, 6]] * 4, eos=eos))
    banned = [set(torch.nonzero(torch.isinf(row)).flatten().tolist()) for row in got]
    assert banned == [{2, 3, 7}, {7}, set(), {2, 3}]


def test_out_of_vocab_ids_are_refused():
    with pytest.raises(ValueError, match="must be < vocab_size=10"):
        build([SamplingParams(logit_bias={10: 1.0})], 10)
    with pytest.raises(ValueError, match="must be < vocab_size=10"):
        SamplingParams(stop_token_ids=[12]).check_token_ids(10)


# --- ties and tiny vocabularies ---


def test_ties_are_kept_together():
    logits = torch.tensor([[3.0, 1.0, 3.0, 0.0, 3.0, 1.0]] * 3)
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.1), SamplingParams(top_k=4, top_p=0.1)]
    kept = torch.isfinite(processed_logits(logits, build(params, 6)))
    # top_k=2 cuts inside a three-way tie at the top: all three stay. top_p=0.1 needs one token
    # of mass ~0.32, and keeps its two equals as well. top_k=4 keeps both 1.0s; top_p then cuts them.
    expected = torch.tensor([True, False, True, False, True, False])
    assert torch.equal(kept, expected.expand(3, -1))


@pytest.mark.parametrize("V", [1, 2, 3])
def test_tiny_vocabularies(V):
    torch.manual_seed(V)
    logits = torch.randn(4, V)
    params = [
        SamplingParams(top_k=5, top_p=0.5, min_p=0.5, logprobs=20),
        SamplingParams(top_k=1),
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.01, repetition_penalty=1.3, frequency_penalty=1.0),
    ]
    out = Sampler()(logits, build(params, V, outputs=[[0], [], [], [0, 0]]))
    top1 = logits.argmax(-1)
    assert out.token_ids[1] == top1[1] and out.token_ids[2] == top1[2]
    assert ((out.token_ids >= 0) & (out.token_ids < V)).all()
    assert out.top_logprob_ids.shape == (4, V)  # 20 asked, V exist


# --- sampling ---


def test_temperature_zero_is_argmax():
    """Below 1e-5 too (vLLM's rule): 1e-38 would overflow float32 and tie every positive logit."""
    torch.manual_seed(6)
    logits = torch.randn(16, 1000) * 5
    logits[3, [10, 20]] = 50.0  # a tie: the first index wins, as torch.argmax documents
    params = [SamplingParams(temperature=t) for t in (0.0, 1e-38, 9e-6, 0.0) * 4]
    out = Sampler()(logits, build(params, 1000))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids[3] == 10


def test_greedy_and_sampled_rows_mix():
    torch.manual_seed(7)
    logits = torch.randn(6, 100)
    params = [SamplingParams(temperature=0.0 if r % 2 else 1.0, top_k=3 if r % 3 == 0 else 0) for r in range(6)]
    out = Sampler()(logits, build(params, 100))
    greedy = [r for r in range(6) if r % 2]
    assert torch.equal(out.token_ids[greedy], logits[greedy].argmax(-1))


def test_logprobs_are_log_softmax_of_penalized_logits():
    """Before temperature and truncation: the logprob of a sampled token is never -inf."""
    torch.manual_seed(8)
    V = 400
    params = [
        SamplingParams(temperature=0.5, top_k=3, logprobs=5, presence_penalty=1.0, logit_bias={1: 2.0}),
        SamplingParams(temperature=1.5, top_p=0.5, logprobs=0),
        SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=1.3),
        SamplingParams(),
    ]
    outputs = [[1, 2, 2], [], [5, 6], []]
    logits = torch.randn(len(params), V) * 2
    batch = build(params, V, outputs, prompts=[[7, 8]] * 4)
    out = Sampler()(logits, batch)
    expected = torch.log_softmax(Sampler.penalize(logits, batch), dim=-1)  # [b, V]
    torch.testing.assert_close(out.logprobs, expected.gather(1, out.token_ids[:, None])[:, 0])
    assert out.top_logprob_ids.shape == (4, 5)
    top_values, _ = expected.topk(5, dim=-1)
    torch.testing.assert_close(out.top_logprobs, top_values)
    torch.testing.assert_close(out.top_logprobs, expected.gather(1, out.top_logprob_ids))
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()  # sorted, descending


def test_no_logprobs_unless_asked_and_input_untouched():
    logits = torch.randn(2, 30)
    before = logits.clone()
    batch = build([SamplingParams(repetition_penalty=2.0, temperature=0.5)] * 2, 30, outputs=[[1], [2]])
    out = Sampler()(logits, batch)
    assert out.top_logprob_ids is None and out.top_logprobs is None and out.logprobs is None
    assert torch.equal(logits, before)
    # logprobs=0: the sampled token's logprob, no top ones.
    batch = build([SamplingParams(temperature=0.5, logprobs=0), SamplingParams()], 30, outputs=[[1], [2]])
    out = Sampler()(logits, batch)
    assert out.top_logprob_ids is None and out.logprobs.shape == (2,)


# --- stateless randomness ---


def _hash32_reference(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x604BAA5D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x43D6CE97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def test_hash32_equals_python_integers():
    """Python's ints never overflow: equality means the int64 version does not either."""
    rng = random.Random(9)
    values = [0, 1, 2**31 - 1, 2**31, 2**32 - 1] + [rng.getrandbits(32) for _ in range(2000)]
    got = hash32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_hash32_reference(v) for v in values]


def test_noise_depends_on_seed_index_and_position_only():
    def draws(seed, index, position):
        """200 draws from a uniform row over 10^5 tokens, one per key derived from the counters
        (position + k): which token wins is decided by the noise alone."""
        s = seed & (2**64 - 1)
        k = torch.arange(200)
        key = noise_key(torch.full_like(k, s & 0xFFFFFFFF), torch.full_like(k, s >> 32), torch.full_like(k, index),
                        position + k)
        return sample_gumbel(torch.zeros(200, 100_000), key)

    base = draws(42, 0, 5)
    assert torch.equal(base, draws(42, 0, 5))
    assert len(set(base.tolist())) > 190  # the positions' noise differs
    for other in (draws(43, 0, 5), draws(42 + 2**32, 0, 5), draws(42, 1, 5), draws(42, 0, 1000), draws(-42, 0, 5)):
        assert (other != base).float().mean() > 0.95


def test_blocked_sampling_equals_the_whole_formula():
    """On the CPU sample_gumbel works in blocks of rows (here 65 rows of 2000): the same draws as
    each row alone."""
    torch.manual_seed(11)
    logits, key = torch.randn(300, 2000), torch.randint(0, 2**32, (300,))
    alone = torch.cat([sample_gumbel(logits[r : r + 1], key[r : r + 1]) for r in range(300)])
    assert torch.equal(sample_gumbel(logits, key), alone)


def test_seeded_row_is_the_same_alone_and_in_any_batch():
    torch.manual_seed(10)
    V = 2000
    target = SamplingRow(SamplingParams(temperature=1.2, top_k=50, top_p=0.95), [1, 2], [3, 4, 5], 777, 1, 3)
    target_logits = torch.randn(V)
    others = [
        SamplingRow(SamplingParams(temperature=0.0), [1], [], 1, 0, 0),
        SamplingRow(SamplingParams(min_p=0.1, logprobs=3), [1], [2], 2, 0, 1),
        SamplingRow(SamplingParams(top_k=5, repetition_penalty=1.5), [5, 6], [7], 3, 2, 1),
        SamplingRow(SamplingParams(top_p=0.5, frequency_penalty=1.0, logit_bias={4: 3.0}), [], [9, 9], 777, 0, 2),
        SamplingRow(SamplingParams(temperature=0.3), [], [1, 1, 1], 777, 1, 4),  # same seed, other position
        SamplingRow(SamplingParams(min_tokens=9), [], [], 5, 0, 0),
        SamplingRow(SamplingParams(temperature=1.2, top_k=50, top_p=0.95), [1, 2], [3, 4, 5], 777, 0, 3),  # index 0
    ]
    sampler = Sampler()
    alone = [sampler(target_logits[None], SamplingBatch.build([target], V, [0], "cpu")).token_ids[0].item()]
    for order in range(5):
        rows = [target] + others
        logits = torch.cat([target_logits[None], torch.randn(len(others), V)])
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(order))
        out = sampler(logits[perm], SamplingBatch.build([rows[i] for i in perm], V, [0], "cpu"))
        alone.append(out.token_ids[(perm == 0).nonzero().item()].item())
    assert len(set(alone)) == 1


def test_draws_follow_the_distribution():
    """N draws (one per output position) of one row: empirical frequencies are within 6
    standard deviations of softmax(processed logits), and a chi-square test passes."""
    N = 20_000
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0, -0.5, 1.5])
    for p in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5, top_p=0.9)):
        # No penalties here, so the output tokens themselves are not needed: only the position.
        rows = [SamplingRow(p, [], [], 99, 0, pos) for pos in range(N)]
        batch = SamplingBatch.build(rows, len(base), [], "cpu")
        logits = base.expand(N, -1)
        expected = torch.softmax(processed_logits(logits, batch)[0], dim=-1).double()  # [V]
        counts = torch.bincount(Sampler()(logits, batch).token_ids, minlength=len(base)).double()
        observed = counts / N
        sigma = (expected * (1 - expected) / N).sqrt()
        assert ((observed - expected).abs() <= 6 * sigma + 1e-12).all(), (observed, expected)
        assert (counts[expected == 0] == 0).all()  # removed tokens are never drawn
        kept = expected > 0
        chi2 = ((counts[kept] - N * expected[kept]) ** 2 / (N * expected[kept])).sum().item()
        dof = int(kept.sum()) - 1
        assert chi2 < dof + 6 * math.sqrt(2 * dof), chi2  # far in the tail of chi-square(dof)


def test_samples_of_one_request_differ():
    """n samples of a request share seed and position; sample_index alone separates them."""
    V = 1000
    p = SamplingParams(n=8)
    rows = [SamplingRow(p, [1], [], 5, index, 0) for index in range(8)]
    out = Sampler()(torch.zeros(8, V), SamplingBatch.build(rows, V, [], "cpu"))  # uniform over 1000
    assert len(set(out.token_ids.tolist())) >= 7
