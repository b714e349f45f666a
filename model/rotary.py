"""Rotary position embedding tables (Megatron-Core's `RotaryEmbedding`), computed once.

The float32 cos/sin cache covers positions [0, max_sequence_length); the rotation itself is
done by the attention backend (kernels/rope.py), on packed tokens with a position each.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        kv_channels: int,
        rotary_percent: float,
        rotary_base: float,
        max_sequence_length: int,
        seq_len_interpolation_factor: float | None = None,
    ) -> None:
        super().__init__()
        # Only the first `dim` channels of each head rotate (rotary_percent < 1: partial rotary).
        dim = int(kv_channels * rotary_percent)
        if dim <= 0 or dim % 2:
            raise ValueError(
                f"kv_channels={kv_channels} * rotary_percent={rotary_percent} gives {dim} rotary "
                f"channels; it must be a positive even number"
            )
        self.dim = dim
        inv_freq = 1.0 / (rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # [dim/2]
        positions = torch.arange(max_sequence_length, dtype=torch.float32)
        if seq_len_interpolation_factor is not None:
            # Position interpolation: positions are squeezed so a longer context maps into the trained range.
            positions = positions / seq_len_interpolation_factor
        freqs = torch.outer(positions, inv_freq)  # [P, dim/2]
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)
