"""The tensor-parallel group a rank belongs to, passed explicitly to every layer.

Megatron-Core keeps its groups in module-level globals; tpserve hands this object to the
layers that communicate, so two models (or a test and a model) never share hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1
    # None when world_size is 1: collectives are then skipped, and no process group is needed.
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} is outside world_size={self.world_size}")
        if self.world_size > 1 and self.group is None:
            raise ValueError(f"world_size={self.world_size} needs a process group")


def initialize_model_parallel(
    rank: int,
    world_size: int,
    init_method: str,
    backend: str = "gloo",
    timeout: timedelta = timedelta(minutes=5),
) -> ParallelState:
    """Join this process to a tensor-parallel group of `world_size` ranks.

    `backend` is "gloo" on the CPU and "nccl" on GPUs. One group spans the whole world: tpserve
    runs one tensor-parallel model per set of workers (pipeline and data parallelism are not used).
    """
    if world_size == 1:
        return ParallelState()
    # The timeout bounds how long a rank waits in a collective for a peer that died.
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    return ParallelState(rank=rank, world_size=world_size, group=dist.group.WORLD)
