"""Rotary position embedding on packed tokens.

Every token carries its own position id, so one call serves prefill, decode and mixed
batches alike. `cos`/`sin` come from a float32 cache indexed by position ([P, r/2], where r
is the rotary dimension: kv_channels * rotary_percent); dims past r pass through unrotated.

Two pairings, as Megatron-Core's `rotary_interleaved`:
  half (Llama):           (x[i], x[i + r/2]) is rotated by angle i
  interleaved (GPT-J):    (x[2i], x[2i + 1]) is rotated by angle i
"""

from __future__ import annotations

import torch


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
