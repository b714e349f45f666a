"""tpserve checkpoint -> Hugging Face folder, so users can check our numbers with their own tools.

The inverse of `hf.py`: Megatron names and layouts back to GPT-2 or the Llama family. Which HF
model_type is written follows from the config: learned positions -> gpt2; RoPE with LayerNorm ->
stablelm; with a sliding window -> mistral; with a qkv bias -> qwen2; else llama.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tpserve.model.builder import GPTModelConfig
from tpserve.model.checkpoint.format import INDEX_FILE, CheckpointError, TokenizerInfo, dtype_name, read_checkpoint_info
from tpserve.model.checkpoint.safetensors_source import SafetensorsSource
from tpserve.model.checkpoint.tokenizer import copy_tokenizer
from tpserve.model.checkpoint.writer import atomic_folder, write_shards
from tpserve.model.config import activation_name

_GPT2_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}


def hf_model_type(config: GPTModelConfig) -> str:
    t = config.transformer
    if t.num_moe_experts is not None:
        return _moe_model_type(t)
    if t.qk_layernorm is not None:  # Llama and Qwen2 have no q/k norms: exporting would drop them
        raise ValueError(f"export to Hugging Face of a model with qk_layernorm={t.qk_layernorm!r} is not supported yet")
    if config.position_embedding_type == "learned_absolute":
        return "gpt2"
    if t.normalization == "LayerNorm":
        return "stablelm"
    if t.window_size is not None:
        return "mistral"
    return "qwen2" if t.add_qkv_bias else "llama"


def _moe_model_type(t) -> str:
    """The Hugging Face family that has this mixture of experts: OLMoE (q/k norms across heads),
    Qwen3-MoE (per head), Qwen2-MoE (a gated shared expert and qkv bias), Mixtral (neither)."""
    problems = []
    if t.moe_router_score_function != "softmax" or t.moe_router_enable_expert_bias or t.moe_router_topk_scaling_factor:
        problems.append("a sigmoid router, an expert bias or a top-k scaling factor")
    shared = t.moe_shared_expert_intermediate_size is not None
    if t.qk_layernorm == "across_heads":
        family = "olmoe"
        problems += ["a shared expert"] * shared + ["qkv bias"] * t.add_qkv_bias + ["dense layers"] * (t.moe_layer_freq != 1)
    elif t.qk_layernorm == "per_head":
        family = "qwen3_moe"
        problems += ["a shared expert"] * shared + ["qkv bias"] * t.add_qkv_bias
    elif shared or t.add_qkv_bias:
        family = "qwen2_moe"
        if not (shared and t.moe_shared_expert_gate and t.add_qkv_bias):
            problems.append("not all of a gated shared expert and qkv bias (Qwen2-MoE has both)")
    else:
        family = "mixtral"
        if t.moe_router_pre_softmax or t.moe_layer_freq != 1:
            problems.append("a softmax over all experts or dense layers")
    if t.window_size is not None and family != "mixtral":
        problems.append("a sliding window")
    if problems:
        raise ValueError(f"this mixture of experts has {', '.join(problems)}, which {family} has not: "
                         "no Hugging Face family to export it as")
    return family


def unfuse_qkv(qkv: torch.Tensor, config: GPTModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's per-group linear_qkv [(n + 2g) * d, ...] -> q [n*d, ...], k [g*d, ...], v [g*d, ...]."""
    t = config.transformer
    g, d, per = t.num_query_groups, t.kv_channels, t.num_heads_per_group
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, (per + 2) * d, *rest)  # [g, (n/g + 2) * d, ...]
    q, k, v = grouped.split([per * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _interleaved_to_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q or k per head from Megatron's interleaved RoPE pairs (x0, x1), (x2, x3), ... to
    Hugging Face's halves (x_i, x_{i+d/2}): a permutation of rows, so the attention is unchanged."""
    rows, rest = w.shape[0], w.shape[1:]
    w = w.reshape(heads, rows // heads // 2, 2, *rest)  # (n, d/2, 2, ...): pairs adjacent
    return w.transpose(1, 2).reshape(rows, *rest)  # (n, 2, d/2, ...): first halves, then second


def hf_config_from_gpt(config: GPTModelConfig, tokenizer: TokenizerInfo, dtype: torch.dtype) -> dict:
    t = config.transformer
    model_type = hf_model_type(config)
    common = {
        "model_type": model_type,
        "architectures": [_ARCHITECTURES[model_type]],
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.share_embeddings_and_output_weights,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "dtype": dtype_name(dtype),
    }
    act = activation_name(t.activation_func)
    if model_type == "gpt2":
        problems = []
        if t.num_query_groups != t.num_attention_heads:
            problems.append("grouped-query attention")
        if t.gated_linear_unit or act not in _GPT2_ACTIVATION:
            problems.append(f"activation {act!r} (gated={t.gated_linear_unit})")
        if not t.add_bias_linear or t.normalization != "LayerNorm" or t.kv_channels * t.num_attention_heads != t.hidden_size:
            problems.append("no biases, RMSNorm, or kv_channels * heads != hidden_size")
        if problems:
            raise CheckpointError(f"a learned-position model with {', '.join(problems)} has no GPT-2 equivalent")
        return common | {
            "n_embd": t.hidden_size,
            "n_layer": t.num_layers,
            "n_head": t.num_attention_heads,
            "n_inner": t.ffn_hidden_size,
            "n_positions": config.seq_length,
            "layer_norm_epsilon": t.layernorm_epsilon,
            "activation_function": _GPT2_ACTIVATION[act],
        }
    if not t.gated_linear_unit or act != "silu" or t.add_bias_linear:
        raise CheckpointError(
            f"a RoPE model needs the Llama MLP (gated silu, no linear biases) to export; this one has "
            f"gated_linear_unit={t.gated_linear_unit}, activation {act!r}, add_bias_linear={t.add_bias_linear}"
        )
    if config.rotary_percent != 1.0 and model_type != "stablelm":
        raise CheckpointError(f"rotary_percent={config.rotary_percent} with RMSNorm has no Hugging Face equivalent")
    if t.rotary_interleaved and config.rotary_percent != 1.0:
        raise CheckpointError("interleaved RoPE on part of the head dimension has no Hugging Face equivalent")
    out = common | {
        "hidden_size": t.hidden_size,
        "intermediate_size": t.ffn_hidden_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_query_groups,
        "head_dim": t.kv_channels,
        "max_position_embeddings": config.seq_length,
        "hidden_act": "silu",
        "rope_theta": config.rotary_base,
    }
    if config.seq_len_interpolation_factor:
        out["rope_scaling"] = {"rope_type": "linear", "factor": config.seq_len_interpolation_factor}
    if model_type == "stablelm":
        out |= {"layer_norm_eps": t.layernorm_epsilon, "partial_rotary_factor": config.rotary_percent,
                "use_qkv_bias": t.add_qkv_bias}
    else:
        out["rms_norm_eps"] = t.layernorm_epsilon
    if model_type == "mistral" or (model_type == "mixtral" and t.window_size is not None):
        out["sliding_window"] = t.window_size[0] + 1  # HF counts the query itself
    if t.num_moe_experts is not None:
        out |= _moe_config(t, model_type)
    if t.qk_layernorm is not None:
        out["attention_bias"] = False
    return out


def _moe_config(t, model_type: str) -> dict:
    experts = {"num_experts_per_tok": t.moe_router_topk, "norm_topk_prob": not t.moe_router_pre_softmax}
    if model_type == "mixtral":
        return experts | {"num_local_experts": t.num_moe_experts, "intermediate_size": t.moe_ffn_hidden_size}
    if model_type == "olmoe":
        return experts | {"num_experts": t.num_moe_experts, "intermediate_size": t.moe_ffn_hidden_size}
    dense = [i for i in range(t.num_layers) if not t.is_moe_layer(i)]
    out = experts | {"num_experts": t.num_moe_experts, "moe_intermediate_size": t.moe_ffn_hidden_size,
                     "decoder_sparse_step": 1, "mlp_only_layers": dense}
    if model_type == "qwen2_moe":
        out["shared_expert_intermediate_size"] = t.moe_shared_expert_intermediate_size
    return out


def hf_state_dict_from_megatron(state, config: GPTModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face names and layouts for Megatron-named full tensors (`state` maps name -> tensor)."""
    if config.position_embedding_type == "learned_absolute":
        return _to_gpt2(state, config)
    return _to_llama(state, config)


def _to_gpt2(state, config: GPTModelConfig) -> dict[str, torch.Tensor]:
    t = config.transformer
    out = {
        "transformer.wte.weight": state["embedding.word_embeddings.weight"],
        "transformer.wpe.weight": state["embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": state["decoder.final_layernorm.weight"],
        "transformer.ln_f.bias": state["decoder.final_layernorm.bias"],
    }
    for i in range(t.num_layers):
        src, dst = f"decoder.layers.{i}.", f"transformer.h.{i}."
        q, k, v = unfuse_qkv(state[src + "self_attention.linear_qkv.weight"], config)
        qb, kb, vb = unfuse_qkv(state[src + "self_attention.linear_qkv.bias"], config)
        # GPT-2's Conv1D stores [in, out]: transpose every linear weight back.
        out |= {
            dst + "ln_1.weight": state[src + "input_layernorm.weight"],
            dst + "ln_1.bias": state[src + "input_layernorm.bias"],
            dst + "attn.c_attn.weight": torch.cat((q, k, v)).t(),
            dst + "attn.c_attn.bias": torch.cat((qb, kb, vb)),
            dst + "attn.c_proj.weight": state[src + "self_attention.linear_proj.weight"].t(),
            dst + "attn.c_proj.bias": state[src + "self_attention.linear_proj.bias"],
            dst + "ln_2.weight": state[src + "pre_mlp_layernorm.weight"],
            dst + "ln_2.bias": state[src + "pre_mlp_layernorm.bias"],
            dst + "mlp.c_fc.weight": state[src + "mlp.linear_fc1.weight"].t(),
            dst + "mlp.c_fc.bias": state[src + "mlp.linear_fc1.bias"],
            dst + "mlp.c_proj.weight": state[src + "mlp.linear_fc2.weight"].t(),
            dst + "mlp.c_proj.bias": state[src + "mlp.linear_fc2.bias"],
        }
    if not config.share_embeddings_and_output_weights:
        out["lm_head.weight"] = state["output_layer.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _to_llama(state, config: GPTModelConfig) -> dict[str, torch.Tensor]:
    t = config.transformer
    layer_norm = t.normalization == "LayerNorm"
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
    }
    if layer_norm:
        out["model.norm.bias"] = state["decoder.final_layernorm.bias"]
    for i in range(t.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = unfuse_qkv(state[src + "self_attention.linear_qkv.weight"], config)
        if t.rotary_interleaved:
            q, k = _interleaved_to_half(q, t.num_attention_heads), _interleaved_to_half(k, t.num_query_groups)
        out |= {
            dst + "input_layernorm.weight": state[src + "input_layernorm.weight"],
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
            dst + "self_attn.o_proj.weight": state[src + "self_attention.linear_proj.weight"],
            dst + "post_attention_layernorm.weight": state[src + "pre_mlp_layernorm.weight"],
        }
        if t.qk_layernorm is not None:
            out[dst + "self_attn.q_norm.weight"] = state[src + "self_attention.q_layernorm.weight"]
            out[dst + "self_attn.k_norm.weight"] = state[src + "self_attention.k_layernorm.weight"]
        if t.is_moe_layer(i):
            out |= _moe_layer(state, src + "mlp.", dst, t)
        else:
            gate, up = state[src + "mlp.linear_fc1.weight"].chunk(2)
            out |= {dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
                    dst + "mlp.down_proj.weight": state[src + "mlp.linear_fc2.weight"]}
        if layer_norm:
            out[dst + "input_layernorm.bias"] = state[src + "input_layernorm.bias"]
            out[dst + "post_attention_layernorm.bias"] = state[src + "pre_mlp_layernorm.bias"]
        if t.add_qkv_bias:
            qb, kb, vb = unfuse_qkv(state[src + "self_attention.linear_qkv.bias"], config)
            if t.rotary_interleaved:
                qb, kb = _interleaved_to_half(qb, t.num_attention_heads), _interleaved_to_half(kb, t.num_query_groups)
            out |= {dst + "self_attn.q_proj.bias": qb, dst + "self_attn.k_proj.bias": kb,
                    dst + "self_attn.v_proj.bias": vb}
    if not config.share_embeddings_and_output_weights:
        out["lm_head.weight"] = state["output_layer.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def _moe_layer(state, src: str, dst: str, t) -> dict[str, torch.Tensor]:
    """A MoE layer in the per-expert layout published checkpoints use (Mixtral's w1/w3/w2 names
    under block_sparse_moe, the others' gate/up/down_proj under mlp)."""
    mixtral = t.qk_layernorm is None and t.moe_shared_expert_intermediate_size is None and not t.add_qkv_bias
    block = dst + ("block_sparse_moe." if mixtral else "mlp.")
    out = {block + "gate.weight": state[src + "router.weight"]}
    for e in range(t.num_moe_experts):
        expert = f"{src}experts.local_experts.{e}."
        gate, up = state[expert + "linear_fc1.weight"].chunk(2)
        down = state[expert + "linear_fc2.weight"]
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        out |= {f"{block}experts.{e}.{n}.weight": w for n, w in zip(names, (gate, up, down))}
    if t.moe_shared_expert_intermediate_size is not None:
        gate, up = state[src + "shared_experts.linear_fc1.weight"].chunk(2)
        out |= {block + "shared_expert.gate_proj.weight": gate, block + "shared_expert.up_proj.weight": up,
                block + "shared_expert.down_proj.weight": state[src + "shared_experts.linear_fc2.weight"],
                block + "shared_expert_gate.weight": state[src + "shared_experts.gate_weight"]}
    return out


class _FullTensors:
    """name -> whole tensor, read from a checkpoint when asked."""

    def __init__(self, source: SafetensorsSource) -> None:
        self.source = source

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.source.read(name)


def export_hf(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None,
              max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write the tpserve checkpoint `src` as a Hugging Face folder `dst` (stored dtype unless given)."""
    info = read_checkpoint_info(src)
    dtype = dtype or info.dtype
    config = info.config
    hf_config = hf_config_from_gpt(config, info.tokenizer, dtype)
    state = hf_state_dict_from_megatron(_FullTensors(SafetensorsSource(info.path)), config)
    dst = Path(dst)
    with atomic_folder(dst) as tmp:
        weight_map, total = write_shards(tmp, state, dtype, max_shard_bytes)
        files = sorted(set(weight_map.values()))
        if len(files) == 1:
            (tmp / files[0]).rename(tmp / "model.safetensors")  # one file: HF's single-file name
        else:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if info.has_tokenizer:
            copy_tokenizer(info.path, tmp, info.chat_template)
    return dst
