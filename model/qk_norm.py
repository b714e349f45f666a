"""Normalising queries and keys before RoPE (`TransformerConfig.qk_layernorm`).

Per head (Megatron-Core's `q_layernorm`/`k_layernorm`, Qwen3 and Qwen3-MoE): each head's d
values are normalised with one weight of [d], shared by the heads. Across heads (OLMoE's
`q_norm`/`k_norm`): a token's whole query projection [n*d] (and key projection [g*d]) is one
RMSNorm with a weight of that width; under tensor parallelism each rank holds its heads' slice
of the weight, and the mean square is summed over the ranks (one small all-reduce each).
"""

from __future__ import annotations

import torch
from torch import nn

from tpserve.model.parallel_state import ParallelState
from tpserve.model.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from tpserve.model.tensor_parallel.sharding import TensorSharding


class AcrossHeadsRMSNorm(nn.Module):
    def __init__(self, width: int, eps: float, parallel_state: ParallelState, params_dtype: torch.dtype) -> None:
        """`width`: the whole projection's (all ranks); this rank holds width / tp of the weight."""
        super().__init__()
        self.width, self.eps, self.parallel_state = width, eps, parallel_state
        local = width // parallel_state.tensor_model_parallel_size
        self.weight = nn.Parameter(torch.empty(local, dtype=params_dtype), requires_grad=False)

    def sharding(self, name: str) -> TensorSharding:
        return TensorSharding(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [t, width / tp]: this rank's heads of each token."""
        squares = x.float().pow(2).sum(-1, keepdim=True)  # [t, 1]
        squares = reduce_from_tensor_model_parallel_region(squares, self.parallel_state)
        return (x.float() * torch.rsqrt(squares / self.width + self.eps)).to(x.dtype) * self.weight
