"""Layer specs: which classes fill a transformer layer's slots.

`local_layer_spec` is plain torch plus tpserve's kernels, with the attention backend named
explicitly. `default_layer_spec` is the seam where a Transformer Engine spec will plug in once
one is tested; until then it returns the local spec.
"""

from __future__ import annotations

from tpserve.model.attention import SelfAttention, SelfAttentionSubmodules
from tpserve.model.config import TransformerConfig
from tpserve.model.core_attention import (
    AttentionBackend,
    CpuDotProductAttention,
    TorchDotProductAttention,
    TritonDotProductAttention,
)
from tpserve.model.mlp import MLP, MLPSubmodules
from tpserve.model.moe import MoELayer, MoESubmodules
from tpserve.model.norm import Norm
from tpserve.model.spec_utils import ModuleSpec
from tpserve.model.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from tpserve.model.transformer_layer import TransformerLayer, TransformerLayerSubmodules

_CORE_ATTENTION = {
    AttentionBackend.TORCH: TorchDotProductAttention,
    AttentionBackend.CPU: CpuDotProductAttention,
    AttentionBackend.TRITON: TritonDotProductAttention,
}


def local_layer_spec(attention_backend: AttentionBackend) -> ModuleSpec:
    if attention_backend not in _CORE_ATTENTION:
        raise ValueError(
            f"attention backend {attention_backend!r} has no core attention class; "
            f"use one of {[b.value for b in _CORE_ATTENTION]}"
        )
    return ModuleSpec(
        TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                SelfAttention,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=_CORE_ATTENTION[attention_backend],
                    linear_proj=RowParallelLinear,
                ),
            ),
            pre_mlp_layernorm=Norm,
            mlp=ModuleSpec(MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            moe=ModuleSpec(MoELayer, submodules=MoESubmodules(
                experts=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))),
        ),
    )


def default_layer_spec(config: TransformerConfig, attention_backend: AttentionBackend) -> ModuleSpec:
    """The best spec this installation can run (no Transformer Engine spec is shipped yet)."""
    return local_layer_spec(attention_backend)
