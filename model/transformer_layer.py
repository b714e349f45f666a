"""`TransformerLayer`: pre-norm attention and MLP, each with a residual connection.

    x = x + self_attention(input_layernorm(x))
    x = x + mlp(pre_mlp_layernorm(x))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tpserve.model.config import TransformerConfig
from tpserve.model.inference_params import InferenceParams
from tpserve.model.packed_seq_params import PackedSeqParams
from tpserve.model.parallel_state import ParallelState
from tpserve.model.rotary import RotaryEmbedding
from tpserve.model.spec_utils import ModuleSpec, build_module


@dataclass
class TransformerLayerSubmodules:
    input_layernorm: ModuleSpec | type
    self_attention: ModuleSpec | type[nn.Module]
    pre_mlp_layernorm: ModuleSpec | type
    mlp: ModuleSpec | type[nn.Module]
    # What takes the MLP's place in the layers config.is_moe_layer names (model/moe.py).
    moe: ModuleSpec | type[nn.Module] | None = None


class TransformerLayer(nn.Module):
    def __init__(
        self,
        config: TransformerConfig,
        submodules: TransformerLayerSubmodules,
        layer_number: int,
        parallel_state: ParallelState,
    ) -> None:
        super().__init__()
        self.layer_number = layer_number  # 1-based, as in Megatron-Core
        self.input_layernorm = build_module(submodules.input_layernorm, config, config.hidden_size)
        self.self_attention = build_module(
            submodules.self_attention, config, layer_number=layer_number, parallel_state=parallel_state
        )
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, config, config.hidden_size)
        moe = config.is_moe_layer(layer_number - 1) and submodules.moe is not None
        self.mlp = build_module(submodules.moe if moe else submodules.mlp, config, parallel_state=parallel_state)

    def forward(
        self,
        hidden_states: torch.Tensor,  # [t, h]
        position_ids: torch.Tensor,
        rotary: RotaryEmbedding | None,
        packed_seq_params: PackedSeqParams,
        inference_params: InferenceParams | None,
    ) -> torch.Tensor:
        attn = self.self_attention(
            self.input_layernorm(hidden_states), position_ids, rotary, packed_seq_params, inference_params
        )
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.pre_mlp_layernorm(hidden_states))
