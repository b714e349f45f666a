"""Where a rank sits in the model-parallel layout, passed explicitly to every layer that talks.

Megatron-Core keeps its groups in module-level globals; tpserve hands this object to the layers
that communicate, so two models (or a test and a model) never share hidden state.

The layout is Megatron's: world = TP × PP, tensor-parallel ranks fastest. With TP 2 and PP 2,
ranks 0 and 1 are the first stage's tensor-parallel pair, ranks 2 and 3 the second stage's; rank
0 sends its hidden states to rank 2, rank 1 to rank 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    tensor_model_parallel_rank: int = 0
    tensor_model_parallel_size: int = 1
    # The ranks of this stage's tensor-parallel group; None when the size is 1 (no collectives).
    tensor_model_parallel_group: dist.ProcessGroup | None = None
    pipeline_model_parallel_rank: int = 0
    pipeline_model_parallel_size: int = 1

    def __post_init__(self) -> None:
        for kind in ("tensor", "pipeline"):
            rank, size = getattr(self, f"{kind}_model_parallel_rank"), getattr(self, f"{kind}_model_parallel_size")
            if not 0 <= rank < size:
                raise ValueError(f"{kind}_model_parallel_rank={rank} is outside {kind}_model_parallel_size={size}")
        if self.tensor_model_parallel_size > 1 and self.tensor_model_parallel_group is None:
            raise ValueError(f"tensor_model_parallel_size={self.tensor_model_parallel_size} needs a process group")

    @property
    def rank(self) -> int:
        """This rank's number in the whole world (the default process group)."""
        return self.pipeline_model_parallel_rank * self.tensor_model_parallel_size + self.tensor_model_parallel_rank

    @property
    def world_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    @property
    def is_pipeline_first_stage(self) -> bool:
        return self.pipeline_model_parallel_rank == 0

    @property
    def is_pipeline_last_stage(self) -> bool:
        return self.pipeline_model_parallel_rank == self.pipeline_model_parallel_size - 1

    @property
    def pipeline_model_parallel_prev_rank(self) -> int:
        """The global rank this one receives hidden states from (same TP rank, stage before)."""
        return self.rank - self.tensor_model_parallel_size

    @property
    def pipeline_model_parallel_next_rank(self) -> int:
        """The global rank this one sends hidden states to (same TP rank, stage after)."""
        return self.rank + self.tensor_model_parallel_size

    def global_rank(self, tensor_model_parallel_rank: int, pipeline_model_parallel_rank: int) -> int:
        return pipeline_model_parallel_rank * self.tensor_model_parallel_size + tensor_model_parallel_rank


def initialize_model_parallel(
    rank: int,
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    init_method: str,
    backend: str = "gloo",
    timeout: timedelta = timedelta(minutes=5),
) -> ParallelState:
    """Join this process, global `rank`, to a world of TP × PP ranks and to its stage's
    tensor-parallel group. `backend` is "gloo" on the CPU and "nccl" on GPUs."""
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    world_size = tp * pp
    if world_size == 1:
        return ParallelState()
    # The timeout bounds how long a rank waits in a collective for a peer that died.
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    group = None
    if tp == world_size:
        group = dist.group.WORLD
    elif tp > 1:
        # Every rank creates every stage's group, in the same order (new_group is collective).
        for stage in range(pp):
            ranks = list(range(stage * tp, (stage + 1) * tp))
            created = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                group = created
    return ParallelState(rank % tp, tp, group, rank // tp, pp)
