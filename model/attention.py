"""`SelfAttention`: fused QKV projection, core attention, output projection.

Tensor parallelism splits heads: rank r holds query groups [r*g/p, (r+1)*g/p) and their heads,
so `linear_qkv` is column-parallel (no communication) and `linear_proj` row-parallel (one
all-reduce).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tpserve.model.config import TransformerConfig
from tpserve.model.norm import Norm
from tpserve.model.qk_norm import AcrossHeadsRMSNorm
from tpserve.model.inference_params import InferenceParams
from tpserve.model.packed_seq_params import PackedSeqParams
from tpserve.model.parallel_state import ParallelState
from tpserve.model.rotary import RotaryEmbedding
from tpserve.model.spec_utils import ModuleSpec, build_module


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: ModuleSpec | type[nn.Module]
    core_attention: ModuleSpec | type[nn.Module]
    linear_proj: ModuleSpec | type[nn.Module]


class SelfAttention(nn.Module):
    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        parallel_state: ParallelState,
    ) -> None:
        super().__init__()
        self.config = config
        d, n, g = config.kv_channels, config.num_attention_heads, config.num_query_groups
        # Rows of the full linear_qkv weight, per query group: its n/g query heads, its key
        # head, its value head (each d rows). Rank r's slice is then whole groups.
        self.linear_qkv = build_module(
            submodules.linear_qkv,
            config.hidden_size,
            (n + 2 * g) * d,
            parallel_state=parallel_state,
            params_dtype=config.params_dtype,
            bias=config.add_bias_linear or config.add_qkv_bias,
        )
        self.q_layernorm = self.k_layernorm = None
        if config.qk_layernorm == "per_head":
            self.q_layernorm, self.k_layernorm = Norm(config, d), Norm(config, d)
        elif config.qk_layernorm == "across_heads":
            self.q_layernorm, self.k_layernorm = (
                AcrossHeadsRMSNorm(width, config.layernorm_epsilon, parallel_state, config.params_dtype)
                for width in (n * d, g * d))
        self.core_attention = build_module(submodules.core_attention, config, layer_number)
        self.linear_proj = build_module(
            submodules.linear_proj,
            n * d,
            config.hidden_size,
            parallel_state=parallel_state,
            params_dtype=config.params_dtype,
            bias=config.add_bias_linear,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,  # [t, h]
        position_ids: torch.Tensor,  # [t]
        rotary: RotaryEmbedding | None,
        packed_seq_params: PackedSeqParams,
        inference_params: InferenceParams | None,
    ) -> torch.Tensor:
        config = self.config
        t = hidden_states.shape[0]
        qkv = self.linear_qkv(hidden_states)  # [t, (n/p + 2g/p) * d]
        qkv = qkv.view(t, config.num_query_groups_local, config.num_heads_per_group + 2, config.kv_channels)
        if self.q_layernorm is not None:
            qkv = self._norm_qk(qkv)
        out = self.core_attention(qkv, position_ids, rotary, packed_seq_params, inference_params)  # [t, n/p, d]
        return self.linear_proj(out.reshape(t, -1))  # [t, h], all-reduced

    def _norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [t, g/p, n/g + 2, d] with q and k normalised (v as it was)."""
        t, groups, _, d = qkv.shape
        q, k, v = qkv.split([self.config.num_heads_per_group, 1, 1], dim=2)
        if self.config.qk_layernorm == "per_head":
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        else:  # rows in head order: the group's heads are consecutive heads
            q = self.q_layernorm(q.reshape(t, -1)).view_as(q)
            k = self.k_layernorm(k.reshape(t, -1)).view_as(k)
        return torch.cat((q, k, v), dim=2)
