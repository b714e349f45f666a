"""`linear_cpu` (the native GEMM for 8-96 tokens, MKL + the native transpose up to 128,
F.linear beyond) against `F.linear`: token counts on both sides of every switch, weights whose
rows are not a multiple of the kernel's 6-row tile, odd feature counts, a bias, rows of x with
a stride past their length, and a weight that is a view of a bigger tensor (a TP shard)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tpserve.kernels.cpu_linear import NATIVE_TOKENS, linear_cpu

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t", [1, 7, 8, 13, 16, 17, 64, 96, 97, 128, 129, 300])
@pytest.mark.parametrize("n, k, bias", [(960, 576, False), (13, 37, True), (7, 64, False), (100, 9, True)])
def test_matches_f_linear(t, n, k, bias):
    gen = torch.Generator().manual_seed(t * 1000 + n + k)
    x = torch.randn(t, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    b = torch.randn(n, generator=gen) if bias else None
    torch.testing.assert_close(linear_cpu(x, w, b), F.linear(x, w, b), **TOL)


def test_strided_rows_and_a_weight_shard():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 90, generator=gen)[:, 5:69]  # [40, 64], row stride 90
    full = torch.randn(50, 80, generator=gen)
    w = full[10:41, :64]  # [31, 64], row stride 80: rows 10-40 of a bigger weight
    assert x.shape[0] in NATIVE_TOKENS
    torch.testing.assert_close(linear_cpu(x, w), F.linear(x, w), **TOL)


def test_refuses_a_feature_count_that_does_not_match():
    with pytest.raises(ValueError, match="input has 10 features, the weight takes 12"):
        linear_cpu(torch.zeros(16, 10), torch.zeros(4, 12))


def test_a_bias_of_the_wrong_length_is_an_error_not_a_read_past_it():
    with pytest.raises(RuntimeError):
        linear_cpu(torch.zeros(16, 32), torch.zeros(1000, 32), torch.zeros(3))
