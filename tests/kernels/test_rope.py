"""Triton fused RoPE (`rope_`) against `rope_reference`.

The kernel rotates in place inside the fused QKV tensor [t, g, n/g + 2, d]; every element must
come out as the reference has it: query and key heads rotated (the first r dims), value heads
and dims past r untouched, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from kernel_targets import Target

from tpserve.kernels.rope import rope_, rope_reference

# (tokens, groups g, query heads per group n/g, head dim d, rotary dim r, interleaved), chosen
# pairwise: GQA 1/4/5/8, d 64/128, full and partial rotary (r/2 not a power of two too), both
# pairings, a single decode token and a ragged mixed batch.
CASES = [
    (1, 1, 1, 64, 64, False),
    (37, 2, 4, 64, 64, True),
    (50, 8, 1, 128, 128, False),
    (13, 1, 5, 128, 32, True),
    (64, 4, 8, 64, 32, False),
    (7, 3, 3, 128, 96, False),
    (200, 2, 2, 64, 48, True),
    (9, 1, 8, 128, 128, True),
]


def _tables(max_pos: int, r: int, generator: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r, 2, dtype=torch.float32) / r))
    inv_freq = inv_freq * (1 + 0.1 * torch.rand(r // 2, generator=generator))  # not the textbook table
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)  # [P, r/2]
    return freqs.cos().to(device), freqs.sin().to(device)


@pytest.mark.parametrize("t, g, hpg, d, r, interleaved", CASES)
def test_rope_matches_reference(target: Target, t, g, hpg, d, r, interleaved):
    gen = torch.Generator().manual_seed(hash((t, g, hpg, d, r)) % 2**31)
    qkv = target.randn(t, g, hpg + 2, d, generator=gen)
    # Positions out of order and repeated, as a packed batch of several sequences has them.
    positions = torch.randint(0, 4096, (t,), generator=gen).to(target.device)
    cos, sin = _tables(4096, r, gen, target.device)
    query = qkv[:, :, :hpg].reshape(t, g * hpg, d)  # [t, n, d] copy
    key = qkv[:, :, hpg].clone()  # [t, g, d]
    want_q, want_k = rope_reference(query, key, positions, cos, sin, interleaved)

    got = qkv.clone()
    rope_(got, positions, cos, sin, interleaved)

    tol = dict(rtol=target.rtol, atol=target.atol)
    torch.testing.assert_close(got[:, :, :hpg].reshape(t, g * hpg, d), want_q, **tol)
    torch.testing.assert_close(got[:, :, hpg], want_k, **tol)
    assert torch.equal(got[:, :, hpg + 1], qkv[:, :, hpg + 1]), "value heads must not be touched"
    assert torch.equal(got[..., r:], qkv[..., r:]), "dims past the rotary dim must not be touched"


def test_rope_int32_positions_and_a_strided_qkv(interpreter):
    """A qkv that is a slice of a bigger buffer (strides not its own shape's) and int32 positions."""
    gen = torch.Generator().manual_seed(7)
    big = torch.randn(20, 2, 5, 70, generator=gen)
    qkv = big[3:15, :, :, :64]  # [12, 2, 5, 64], row stride 700
    positions = torch.randint(0, 50, (12,), generator=gen, dtype=torch.int32)
    cos, sin = _tables(50, 64, gen, "cpu")
    want_q, want_k = rope_reference(qkv[:, :, :3].reshape(12, 6, 64), qkv[:, :, 3], positions.long(), cos, sin, False)
    before = big.clone()
    rope_(qkv, positions, cos, sin, False)
    torch.testing.assert_close(qkv[:, :, :3].reshape(12, 6, 64), want_q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(qkv[:, :, 3], want_k, rtol=1e-4, atol=1e-5)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[3:15, :, :4, :64] = False
    assert torch.equal(big[outside], before[outside]), "nothing outside q and k may change"


def test_rope_launcher_refuses_bad_inputs(interpreter):
    qkv = torch.zeros(4, 2, 3, 16)
    cos = sin = torch.zeros(10, 8)
    pos = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="cos_cache has dtype torch.float64"):
        rope_(qkv, pos, cos.double(), sin.double(), False)
    with pytest.raises(ValueError, match=r"positions has shape \[3\]"):
        rope_(qkv, pos[:3], cos, sin, False)
    with pytest.raises(ValueError, match="rotary dim 2 \\* 12 does not fit head dim 16"):
        rope_(qkv, pos, torch.zeros(10, 12), torch.zeros(10, 12), False)
    with pytest.raises(ValueError, match="qkv must be contiguous in its last dimension"):
        rope_(torch.zeros(4, 2, 3, 32)[..., ::2], pos, cos, sin, False)
    with pytest.raises(ValueError, match="positions has dtype torch.float32"):
        rope_(qkv, pos.float(), cos, sin, False)
