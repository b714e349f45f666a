"""The CPU linear candidates against `F.linear`, and `LinearKernels`' dispatch by token bucket.

Every candidate on every token bucket the engine times (1 to 512) and counts between buckets,
weights whose rows are not a multiple of the native kernel's 6-row tile, odd feature counts, a
bias, rows of x with a stride past their length, and a weight that is a view of a bigger tensor
(a TP shard)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tpserve.kernels import cpu_linear
from tpserve.kernels.cpu_linear import CANDIDATES, Candidate, LinearKernels, buckets_up_to, token_bucket

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
TOKENS = [*buckets_up_to(512), 7, 13, 97, 300]


@pytest.mark.parametrize("name", sorted(CANDIDATES))
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("n, k, bias", [(960, 576, False), (13, 37, True), (7, 64, False), (100, 9, True)])
def test_every_candidate_matches_f_linear(name, t, n, k, bias):
    gen = torch.Generator().manual_seed(t * 1000 + n + k)
    x = torch.randn(t, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if bias else None
    torch.testing.assert_close(CANDIDATES[name].fn(x, w, b), F.linear(x, w, b), **TOL[torch.float32])


@pytest.mark.parametrize("name", [n for n, c in sorted(CANDIDATES.items()) if torch.bfloat16 in c.dtypes])
@pytest.mark.parametrize("t", [1, 16, 64, 300])
def test_bfloat16_candidates_match_f_linear(name, t):
    gen = torch.Generator().manual_seed(t)
    x = torch.randn(t, 576, generator=gen).bfloat16()
    w = (torch.randn(960, 576, generator=gen) / 24).bfloat16()
    b = torch.randn(960, generator=gen).bfloat16()
    torch.testing.assert_close(CANDIDATES[name].fn(x, w, b), F.linear(x, w, b), **TOL[torch.bfloat16])


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_strided_rows_and_a_weight_shard(name):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 90, generator=gen)[:, 5:69]  # [40, 64], row stride 90
    full = torch.randn(50, 80, generator=gen)
    w = full[10:41, :64]  # [31, 64], row stride 80: rows 10-40 of a bigger weight
    torch.testing.assert_close(CANDIDATES[name].fn(x, w), F.linear(x, w), **TOL[torch.float32])


@pytest.mark.parametrize("name", ["native", "mm_t"])
def test_refuses_a_feature_count_that_does_not_match(name):
    with pytest.raises(ValueError, match="input has 10 features, the weight takes 12"):
        CANDIDATES[name].fn(torch.zeros(16, 10), torch.zeros(4, 12))


def test_a_bias_of_the_wrong_length_is_an_error_not_a_read_past_it():
    with pytest.raises(RuntimeError):
        CANDIDATES["native"].fn(torch.zeros(16, 32), torch.zeros(1000, 32), torch.zeros(3))


def test_token_buckets():
    assert [token_bucket(t) for t in (1, 2, 3, 4, 5, 64, 65, 2048)] == [1, 2, 4, 4, 8, 64, 128, 2048]
    assert buckets_up_to(100) == [1, 2, 4, 8, 16, 32, 64, 128]


def test_each_token_count_calls_its_buckets_candidate(monkeypatch):
    calls = []

    def spy(name):
        def fn(x, weight, bias=None):
            calls.append((name, x.shape[0]))
            return F.linear(x, weight, bias)
        return Candidate(fn, (torch.float32,))

    for name in CANDIDATES:
        monkeypatch.setitem(cpu_linear.CANDIDATES, name, spy(name))
    kernels = LinearKernels({1: "native", 2: "torch", 4: "mm_t", 8: "torch"})
    w = torch.randn(5, 3)
    for t in (1, 2, 3, 4, 5, 8, 9, 500):
        torch.testing.assert_close(kernels(torch.ones(t, 3), w), F.linear(torch.ones(t, 3), w))
    # 3 and 4 share the bucket 4; past the last bucket (8) its candidate goes on.
    assert calls == [("native", 1), ("torch", 2), ("mm_t", 3), ("mm_t", 4), ("torch", 5), ("torch", 8),
                     ("torch", 9), ("torch", 500)]


def test_kernels_refuse_gaps_and_unknown_names():
    with pytest.raises(ValueError, match="without gaps"):
        LinearKernels({1: "torch", 4: "native"})
    with pytest.raises(ValueError, match="no CPU linear kernel 'cublas'"):
        LinearKernels.pinned("cublas")
