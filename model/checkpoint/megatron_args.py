"""Megatron-LM training arguments -> GPTModelConfig.

Megatron checkpoints do not describe the model in their tensors alone (head counts, norm type,
activation, RoPE settings are not in the shapes); Megatron-LM stores its command-line arguments
(`args`, an argparse.Namespace) beside the weights. This reads them by Megatron-LM's own names
(`--num-layers` is `num_layers`, ...), from that Namespace or from a plain JSON file of the same
names, for users who would rather not unpickle. Old checkpoints lack newer arguments; the
defaults below are Megatron-LM's defaults for them.
"""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path
from typing import Any, Mapping

from tpserve.model.builder import GPTModelConfig
from tpserve.model.checkpoint.format import CheckpointError
from tpserve.model.config import ACTIVATIONS, TransformerConfig

# Arguments whose non-default value means a model tpserve does not compute correctly.
_UNSUPPORTED = {
    "apply_residual_connection_post_layernorm": False,
    "squared_relu": False,
    "multi_latent_attention": False,
    "apply_query_key_layer_scaling": False,
}
# The training's tensor and pipeline sizes say how the files are split, not what the model is:
# the converters join the parts, and the served sizes are chosen at load time.


def read_megatron_args_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file (a JSON object of Megatron-LM arguments)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def gpt_config_from_megatron_args(
    args: Mapping[str, Any] | Namespace, where: str = "Megatron args", vocab_size: int | None = None
) -> GPTModelConfig:
    """The model Megatron-LM `args` describe. `vocab_size` is the tokenizer's real size, which
    Megatron-LM does not store (only padded_vocab_size); None keeps the padded size."""
    a = dict(vars(args)) if isinstance(args, Namespace) else dict(args)

    def need(name: str):
        if a.get(name) is None:
            raise CheckpointError(f"{where}: argument {name!r} is missing")
        return a[name]

    for name, default in _UNSUPPORTED.items():
        if a.get(name, default) not in (default, None, False):
            raise CheckpointError(f"{where}: {name}={a[name]!r} is not supported by tpserve")
    if a.get("swiglu"):
        activation, gated = "silu", True
    elif a.get("openai_gelu") or a.get("bias_gelu_fusion"):
        activation, gated = "gelu_tanh", False  # Megatron's fused bias-gelu is the tanh approximation
    else:
        activation, gated = "gelu", False
    position = a.get("position_embedding_type") or (
        "rope" if a.get("use_rotary_position_embeddings") else "learned_absolute"
    )
    heads = need("num_attention_heads")
    groups = a.get("num_query_groups") if a.get("group_query_attention") else None
    epsilon = a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5))
    window = a.get("window_size")
    try:
        transformer = TransformerConfig(
            num_layers=need("num_layers"),
            hidden_size=need("hidden_size"),
            num_attention_heads=heads,
            num_query_groups=groups or heads,
            ffn_hidden_size=a.get("ffn_hidden_size"),
            kv_channels=a.get("kv_channels"),
            normalization=a.get("normalization") or "LayerNorm",
            layernorm_epsilon=epsilon,
            gated_linear_unit=gated,
            activation_func=ACTIVATIONS[activation],
            add_bias_linear=a.get("add_bias_linear", True),
            add_qkv_bias=bool(a.get("add_qkv_bias", False)),
            rotary_interleaved=bool(a.get("rotary_interleaved", False)),
            window_size=tuple(window) if window else None,
            qk_layernorm="per_head" if a.get("qk_layernorm") else None,
            **_moe_fields(a),
        )
        padded = need("padded_vocab_size")
        if vocab_size is not None and vocab_size > padded:
            raise CheckpointError(f"{where}: vocab_size={vocab_size} is larger than padded_vocab_size={padded}")
        return GPTModelConfig(
            transformer=transformer,
            vocab_size=vocab_size or padded,
            make_vocab_size_divisible_by=a.get("make_vocab_size_divisible_by") or 128,
            should_pad_vocab=True,
            seq_length=a.get("max_position_embeddings") or need("seq_length"),
            share_embeddings_and_output_weights=not a.get("untie_embeddings_and_output_weights", False),
            position_embedding_type=position,
            rotary_percent=float(a.get("rotary_percent", 1.0)),
            rotary_base=float(a.get("rotary_base", 10000)),
            seq_len_interpolation_factor=a.get("rotary_seq_len_interpolation_factor"),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def _moe_fields(a: dict[str, Any]) -> dict[str, Any]:
    """TransformerConfig's MoE fields from Megatron-LM's `--num-experts` and `--moe-*` arguments.
    Training-only ones (aux-loss coefficients, token dropping and the capacity factor, input
    jitter) are ignored, as Megatron's inference does: no token is ever dropped."""
    if not a.get("num_experts"):
        return {}
    freq = a.get("moe_layer_freq", 1)
    if isinstance(freq, str):  # Megatron-LM's pattern syntax, e.g. "([0]*1+[1]*3)"
        raise ValueError(f"moe_layer_freq={freq!r}: give the pattern as a list of 0/1 per layer in the args JSON")
    fields = {
        "num_moe_experts": a["num_experts"],
        "moe_router_topk": a.get("moe_router_topk", 2),
        "moe_ffn_hidden_size": a.get("moe_ffn_hidden_size") or a.get("ffn_hidden_size"),
        "moe_shared_expert_intermediate_size": a.get("moe_shared_expert_intermediate_size"),
        "moe_shared_expert_gate": bool(a.get("moe_shared_expert_gate", False)),
        "moe_router_score_function": a.get("moe_router_score_function") or "softmax",
        "moe_router_pre_softmax": bool(a.get("moe_router_pre_softmax", False)),
        "moe_router_topk_scaling_factor": a.get("moe_router_topk_scaling_factor"),
        "moe_router_enable_expert_bias": bool(a.get("moe_router_enable_expert_bias", False)),
        "moe_layer_freq": freq,
    }
    return fields
