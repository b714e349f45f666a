"""The two collectives tensor parallelism needs at inference time.

Kept as plain functions called inside each layer's `forward`, so every all-reduce and
all-gather is visible where it happens (no hooks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tpserve.model.parallel_state import ParallelState


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Sum partial results across ranks (after a row-parallel matmul or a vocab-split lookup)."""
    if ps.tensor_model_parallel_size > 1:
        dist.all_reduce(x, group=ps.tensor_model_parallel_group)
    return x


def gather_from_tensor_model_parallel_region(x: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Concatenate each rank's slice of the last dimension, in rank order."""
    if ps.tensor_model_parallel_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ps.tensor_model_parallel_size)]
    dist.all_gather(parts, x.contiguous(), group=ps.tensor_model_parallel_group)
    return torch.cat(parts, dim=-1)
