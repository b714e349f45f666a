"""`TransformerConfig`: what the transformer is, in Megatron-Core's field names.

Only the fields inference needs are kept; their names and meanings are Megatron-Core's
(`megatron.core.transformer.TransformerConfig`), so a Megatron user can copy values across.
How the model is *served* (batch sizes, KV-cache size, backends) lives in the engine's config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from tpserve.model.pipeline_split import pipeline_layer_ranges


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new": the tanh approximation of GELU."""
    return F.gelu(x, approximate="tanh")


# Activations by the names checkpoints store them under. Megatron-Core keeps a callable in
# the config; a checkpoint's config.json can only hold a name, so both directions live here.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "silu": F.silu,
    "relu": F.relu,
}


def activation_name(func: Callable[[torch.Tensor], torch.Tensor]) -> str:
    for name, known in ACTIVATIONS.items():
        if func is known:
            return name
    raise ValueError(
        f"activation_func={func!r} has no name a checkpoint can store; use one of {sorted(ACTIVATIONS)}"
    )


def check_known_fields(cls: type, fields: dict) -> None:
    """A config read from a file must name only fields `cls` has (a typo is an error, not ignored)."""
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")


@dataclass
class TransformerConfig:
    # --- shape ---
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    # Grouped-query attention: K/V heads. None means one per attention head (MHA).
    num_query_groups: int | None = None
    # MLP width; Megatron's default is 4 * hidden_size.
    ffn_hidden_size: int | None = None
    # Head dimension; Megatron's default is hidden_size // num_attention_heads.
    kv_channels: int | None = None

    # --- layer details ---
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    # SwiGLU-style MLP: linear_fc1 produces [gate; up] and the output is act(gate) * up.
    gated_linear_unit: bool = False
    activation_func: Callable[[torch.Tensor], torch.Tensor] = F.gelu
    # Bias on every linear layer (GPT-2) ...
    add_bias_linear: bool = True
    # ... or on linear_qkv alone (Qwen2).
    add_qkv_bias: bool = False
    # RoPE pairs: (even, odd) dims when True (GPT-J/RoFormer), (first half, second half) when False (Llama).
    rotary_interleaved: bool = False
    # Sliding-window attention as (left, right) tokens beside the query; -1 means unbounded.
    # Only causal windows (right == 0) make sense for a decoder.
    window_size: tuple[int, int] | None = None
    # Normalise q and k before RoPE (model/qk_norm.py): "per_head" is Megatron-Core's qk_layernorm
    # (Qwen3), "across_heads" a token's whole q and k projections at once (OLMoE); None: neither.
    qk_layernorm: Literal["per_head", "across_heads"] | None = None

    # --- mixture of experts (model/moe.py); None: every layer has a dense MLP ---
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    # Each expert's MLP width; None: ffn_hidden_size.
    moe_ffn_hidden_size: int | None = None
    # A shared expert every token goes through (Qwen2-MoE), of this width; None: none.
    moe_shared_expert_intermediate_size: int | None = None
    # The shared expert's output times sigmoid(x @ gate_weight^T) (Qwen2-MoE's shared_expert_gate).
    moe_shared_expert_gate: bool = False
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    # Softmax over all experts, then the top k unrenormalised (Qwen2-MoE norm_topk_prob=False);
    # False: softmax over the top k logits (Mixtral).
    moe_router_pre_softmax: bool = False
    moe_router_topk_scaling_factor: float | None = None
    # A per-expert bias added to the scores to choose experts, not to weight them.
    moe_router_enable_expert_bias: bool = False
    # Which layers are MoE: every N-th (N = 1: all), or a 0/1 entry per layer (Megatron's
    # pattern: Qwen's decoder_sparse_step and mlp_only_layers, first dense layers).
    moe_layer_freq: int | list[int] = 1

    # --- parallelism and precision ---
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # An uneven first or last pipeline stage (Megatron-LM's --decoder-first/last-pipeline-num-layers);
    # None splits the layers evenly (model/pipeline_split.py).
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    params_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.kv_channels is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set kv_channels (the head dimension) explicitly"
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if isinstance(self.window_size, list):
            self.window_size = tuple(self.window_size)
        if self.num_moe_experts is not None and self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        self._check()

    def _check(self) -> None:
        positive = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                    "ffn_hidden_size", "kv_channels", "tensor_model_parallel_size", "pipeline_model_parallel_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization={self.normalization!r} must be 'LayerNorm' or 'RMSNorm'")
        if self.layernorm_epsilon <= 0:
            raise ValueError(f"layernorm_epsilon={self.layernorm_epsilon} must be > 0")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.num_query_groups}; each query group must hold the same "
                f"number of heads"
            )
        tp = self.tensor_model_parallel_size
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            if getattr(self, name) % tp:
                raise ValueError(
                    f"{name}={getattr(self, name)} is not divisible by tensor_model_parallel_size={tp}; "
                    f"choose a tensor-parallel size that divides it"
                )
        pipeline_layer_ranges(self.num_layers, self.pipeline_model_parallel_size,
                              self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage)
        if self.window_size is not None:
            left, right = self.window_size
            if right != 0 or not (left == -1 or left >= 0):
                raise ValueError(
                    f"window_size={self.window_size} is not a causal window; use (left, 0) with "
                    f"left >= 0 tokens, or -1 for unbounded"
                )
        if not callable(self.activation_func):
            raise ValueError(f"activation_func={self.activation_func!r} is not callable")
        if self.qk_layernorm not in (None, "per_head", "across_heads"):
            raise ValueError(f"qk_layernorm={self.qk_layernorm!r} must be None, 'per_head' or 'across_heads'")
        if self.num_moe_experts is not None:
            self._check_moe()

    def _check_moe(self) -> None:
        if self.num_moe_experts < 1 or not 1 <= self.moe_router_topk <= self.num_moe_experts:
            raise ValueError(f"moe_router_topk={self.moe_router_topk} must be in 1..num_moe_experts="
                             f"{self.num_moe_experts}")
        if self.moe_router_score_function not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_router_score_function={self.moe_router_score_function!r} must be 'softmax' or "
                             f"'sigmoid'")
        if self.add_bias_linear:
            raise ValueError("add_bias_linear=True with num_moe_experts: expert biases are not supported")
        tp = self.tensor_model_parallel_size
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            value = getattr(self, name)
            if value is not None and value % tp:
                raise ValueError(f"{name}={value} is not divisible by tensor_model_parallel_size={tp}; "
                                 f"choose a tensor-parallel size that divides it")
        if isinstance(self.moe_layer_freq, list) and len(self.moe_layer_freq) != self.num_layers:
            raise ValueError(f"moe_layer_freq has {len(self.moe_layer_freq)} entries for num_layers={self.num_layers}")

    def is_moe_layer(self, layer_index: int) -> bool:
        """Whether layer `layer_index` (0-based, global) has a MoELayer in place of its MLP."""
        if self.num_moe_experts is None:
            return False
        if isinstance(self.moe_layer_freq, list):
            return bool(self.moe_layer_freq[layer_index])
        return layer_index % self.moe_layer_freq == 0

    # --- derived sizes (per tensor-parallel rank where it says local) ---
    @property
    def num_heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def pipeline_layers(self, pipeline_rank: int) -> range:
        """The global indices of the layers stage `pipeline_rank` holds."""
        return pipeline_layer_ranges(self.num_layers, self.pipeline_model_parallel_size,
                                     self.num_layers_in_first_pipeline_stage,
                                     self.num_layers_in_last_pipeline_stage)[pipeline_rank]

    @property
    def num_query_groups_local(self) -> int:
        return self.num_query_groups // self.tensor_model_parallel_size

    def to_dict(self) -> dict:
        """JSON-ready fields: the activation by name, the dtype as a string."""
        out = dataclasses.asdict(self)
        out["activation_func"] = activation_name(self.activation_func)
        out["params_dtype"] = str(self.params_dtype).removeprefix("torch.")
        out["window_size"] = list(self.window_size) if self.window_size else None
        return out

    @classmethod
    def from_dict(cls, fields: dict) -> "TransformerConfig":
        fields = dict(fields)
        check_known_fields(cls, fields)
        if isinstance(fields.get("activation_func"), str):
            name = fields["activation_func"]
            if name not in ACTIVATIONS:
                raise ValueError(f"activation_func={name!r} is not one of {sorted(ACTIVATIONS)}")
            fields["activation_func"] = ACTIVATIONS[name]
        if isinstance(fields.get("params_dtype"), str):
            fields["params_dtype"] = getattr(torch, fields["params_dtype"])
        return cls(**fields)
