"""`TransformerBlock`: the stack of layers and the final norm (`decoder.*` in state dicts).

With pipeline parallelism a stage builds only its own contiguous range of layers
(`TransformerConfig.pipeline_layers`), numbered from 0 in `layers` as in Megatron-Core, each
keeping its global 1-based `layer_number`; `layer_offset` maps local indices to checkpoint names.
"""

from __future__ import annotations

import torch
from torch import nn

from tpserve.model.config import TransformerConfig
from tpserve.model.inference_params import InferenceParams
from tpserve.model.norm import Norm
from tpserve.model.packed_seq_params import PackedSeqParams
from tpserve.model.parallel_state import ParallelState
from tpserve.model.rotary import RotaryEmbedding
from tpserve.model.spec_utils import ModuleSpec, build_module


class TransformerBlock(nn.Module):
    def __init__(
        self,
        config: TransformerConfig,
        spec: ModuleSpec,
        parallel_state: ParallelState,
        post_layer_norm: bool = True,
    ) -> None:
        super().__init__()
        layers = config.pipeline_layers(parallel_state.pipeline_model_parallel_rank)
        self.layer_offset = layers.start
        self.layers = nn.ModuleList(
            build_module(spec, config, layer_number=i + 1, parallel_state=parallel_state) for i in layers
        )
        self.final_layernorm = Norm(config, config.hidden_size) if post_layer_norm else None

    def forward(
        self,
        hidden_states: torch.Tensor,  # [t, h]
        position_ids: torch.Tensor,
        rotary: RotaryEmbedding | None,
        packed_seq_params: PackedSeqParams,
        inference_params: InferenceParams | None,
    ) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_ids, rotary, packed_seq_params, inference_params)
        if self.final_layernorm is not None:
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states
