"""The native transpose (`transposed`) against torch's `x.t().contiguous()`, bit for bit: shapes
that are and are not multiples of its 8x8 tiles, a single row or column (a view, no kernel),
rows with a stride past their length, and the dtypes it hands back to torch."""

from __future__ import annotations

import pytest
import torch

from tpserve.kernels.cpu_transpose import transposed


@pytest.mark.parametrize("rows, cols", [(8, 8), (64, 3072), (49152, 64), (13, 29), (3, 100), (100, 3), (1, 50), (50, 1)])
def test_matches_torch(rows, cols):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols))
    got = transposed(x)
    assert got.is_contiguous() and torch.equal(got, x.t())


def test_rows_with_a_stride_past_their_length():
    big = torch.randn(40, 70)
    x = big[5:37, 3:50]  # [32, 47], row stride 70
    assert torch.equal(transposed(x), x.t())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int64])
def test_other_dtypes_take_torchs_copy(dtype):
    x = torch.arange(24 * 16).reshape(24, 16).to(dtype)
    assert torch.equal(transposed(x), x.t().contiguous())


def test_refuses_other_ranks():
    with pytest.raises(ValueError, match="2-D tensor, not 3-D"):
        transposed(torch.zeros(2, 3, 4))
