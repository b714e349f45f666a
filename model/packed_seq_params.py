"""`PackedSeqParams`: how the tokens of one forward are packed ("thd": no padding).

Same fields as Megatron-Core's; tpserve only uses the query side (the key side of a cached
sequence is described by `InferenceParams.context_lens`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedSeqParams:
    qkv_format: str = "thd"
    # [b + 1] int32: sequence i's new tokens are rows cu_seqlens_q[i]:cu_seqlens_q[i+1].
    cu_seqlens_q: torch.Tensor | None = None
    # Host-side maximum of the query lengths, so kernels need no device sync to size a launch.
    max_seqlen_q: int = 0

    @classmethod
    def from_lengths(cls, query_lens: list[int], device: torch.device | str = "cpu") -> "PackedSeqParams":
        cu = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(query_lens, dtype=torch.int32).cumsum(0)
        return cls(cu_seqlens_q=cu.to(device), max_seqlen_q=max(query_lens, default=0))
