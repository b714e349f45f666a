"""`MLP`: linear_fc1 (column-parallel), activation, linear_fc2 (row-parallel, one all-reduce).

With `gated_linear_unit` the full fc1 weight is [gate; up] (all gate rows, then all up rows)
and rank r holds [gate_r; up_r]; the output is act(gate) * up (SwiGLU with silu).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tpserve.model.config import TransformerConfig
from tpserve.model.parallel_state import ParallelState
from tpserve.model.spec_utils import ModuleSpec, build_module


@dataclass
class MLPSubmodules:
    linear_fc1: ModuleSpec | type[nn.Module]
    linear_fc2: ModuleSpec | type[nn.Module]


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules, parallel_state: ParallelState,
                 ffn_hidden_size: int | None = None, reduce_output: bool = True) -> None:
        """`ffn_hidden_size`: the width when not config's (an expert's); `reduce_output=False`
        returns this rank's partial sum, for a MoE layer to all-reduce once."""
        super().__init__()
        self.config = config
        ffn = ffn_hidden_size or config.ffn_hidden_size
        gated = config.gated_linear_unit
        self.linear_fc1 = build_module(
            submodules.linear_fc1,
            config.hidden_size,
            2 * ffn if gated else ffn,
            parallel_state=parallel_state,
            params_dtype=config.params_dtype,
            bias=config.add_bias_linear,
            chunks=2 if gated else 1,
        )
        self.linear_fc2 = build_module(
            submodules.linear_fc2,
            ffn,
            config.hidden_size,
            parallel_state=parallel_state,
            params_dtype=config.params_dtype,
            bias=config.add_bias_linear,
            reduce_output=reduce_output,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.linear_fc1(hidden_states)  # [t, ffn/p] or [t, 2*ffn/p] when gated
        if self.config.gated_linear_unit:
            gate, up = x.chunk(2, dim=-1)  # each [t, ffn/p]
            x = self.config.activation_func(gate) * up
        else:
            x = self.config.activation_func(x)
        return self.linear_fc2(x)  # [t, h], all-reduced
