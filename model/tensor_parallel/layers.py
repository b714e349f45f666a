"""Megatron-Core's tensor-parallel layers, for inference.

Each layer owns its shard shape, says how its shard is cut from the full tensor
(`sharding`), and does its communication visibly in `forward`. Unlike Megatron-Core they
return one tensor, with the bias folded in.

Notation: h hidden, t tokens, p tensor-parallel size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tpserve.model.parallel_state import ParallelState
from tpserve.model.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from tpserve.kernels.cpu_linear import LinearKernels
from tpserve.model.tensor_parallel.sharding import REPLICATED, TensorSharding


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cpu_kernels: LinearKernels | None
) -> torch.Tensor:
    """`F.linear`; on the CPU, the kernel measured fastest for the number of tokens, once a
    layer has been given its `cpu_kernels` (kernels/cpu_tuning.py)."""
    if cpu_kernels is not None and x.device.type == "cpu" and x.dim() == 2:
        return cpu_kernels(x, weight, bias)
    return F.linear(x, weight, bias)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tensor_model_parallel_size={denominator}")
    return numerator // denominator


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b with A split by rows (output features): rank r computes Y[:, r-th slice].

    `chunks` > 1 when the output is several blocks split on their own (gated fc1: [gate; up]).
    `valid_output_size` < output_size for the output layer over a padded vocabulary.
    `skip_weight_param_allocation` is for the output layer with tied embeddings: the weight
    is passed to `forward` instead.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        parallel_state: ParallelState,
        params_dtype: torch.dtype,
        bias: bool,
        gather_output: bool = False,
        chunks: int = 1,
        valid_output_size: int | None = None,
        skip_weight_param_allocation: bool = False,
    ) -> None:
        super().__init__()
        self.parallel_state = parallel_state
        self.gather_output = gather_output
        self.chunks = chunks
        self.valid_output_size = valid_output_size
        _divide(output_size, chunks, "output_size per chunk")
        self.output_size_per_partition = _divide(output_size, parallel_state.tensor_model_parallel_size, "output_size")
        self.input_size = input_size
        self.cpu_kernels: LinearKernels | None = None
        if skip_weight_param_allocation:
            self.weight = None
        else:
            self.weight = nn.Parameter(
                torch.empty(self.output_size_per_partition, input_size, dtype=params_dtype),
                requires_grad=False,
            )
        self.bias = (
            nn.Parameter(torch.empty(self.output_size_per_partition, dtype=params_dtype), requires_grad=False)
            if bias
            else None
        )

    def sharding(self, name: str) -> TensorSharding:
        return TensorSharding(dim=0, chunks=self.chunks, valid=self.valid_output_size)

    @property
    def local_weight_shape(self) -> tuple[int, int]:
        return self.output_size_per_partition, self.input_size

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        y = linear(x, weight, self.bias, self.cpu_kernels)  # [t, out / p]
        if self.gather_output:
            y = gather_from_tensor_model_parallel_region(y, self.parallel_state)  # [t, out]
        return y


class RowParallelLinear(nn.Module):
    """Y = X A^T + b with A split by columns (input features): partial sums are all-reduced.

    The input arrives already split along its last dimension (the output of a column-parallel
    layer), so no scatter is needed. The bias is added once, after the all-reduce.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        parallel_state: ParallelState,
        params_dtype: torch.dtype,
        bias: bool,
        reduce_output: bool = True,
    ) -> None:
        """`reduce_output=False`: return this rank's partial sum (a MoE layer's experts, summed and
        all-reduced once); it then takes no bias, which would be added once per rank."""
        super().__init__()
        if bias and not reduce_output:
            raise ValueError("a RowParallelLinear that does not reduce its output cannot add a bias")
        self.reduce_output = reduce_output
        self.parallel_state = parallel_state
        self.input_size_per_partition = _divide(input_size, parallel_state.tensor_model_parallel_size, "input_size")
        self.output_size = output_size
        self.cpu_kernels: LinearKernels | None = None
        self.weight = nn.Parameter(
            torch.empty(output_size, self.input_size_per_partition, dtype=params_dtype), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(output_size, dtype=params_dtype), requires_grad=False) if bias else None
        )

    def sharding(self, name: str) -> TensorSharding:
        return TensorSharding(dim=1) if name == "weight" else REPLICATED

    @property
    def local_weight_shape(self) -> tuple[int, int]:
        return self.output_size, self.input_size_per_partition

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, None, self.cpu_kernels)  # [t, out], this rank's partial sum
        if self.reduce_output:
            y = reduce_from_tensor_model_parallel_region(y, self.parallel_state)
        if self.bias is not None:
            y = y + self.bias
        return y


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by rows (vocabulary) across ranks.

    Rank r holds rows [r * V/p, (r+1) * V/p) of the padded vocabulary; a token outside its
    range looks up zeros there, and the all-reduce sums the one real row in.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        parallel_state: ParallelState,
        params_dtype: torch.dtype,
        valid_rows: int,
    ) -> None:
        super().__init__()
        self.parallel_state = parallel_state
        self.num_embeddings = num_embeddings
        self.valid_rows = valid_rows
        per_rank = _divide(num_embeddings, parallel_state.tensor_model_parallel_size, "padded vocab_size")
        self.vocab_start_index = parallel_state.tensor_model_parallel_rank * per_rank
        self.vocab_end_index = self.vocab_start_index + per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim, dtype=params_dtype), requires_grad=False)

    def sharding(self, name: str) -> TensorSharding:
        return TensorSharding(dim=0, valid=self.valid_rows)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel_state.tensor_model_parallel_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight)  # [t, h]
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(out, self.parallel_state)
