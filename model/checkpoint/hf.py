"""Hugging Face models in Megatron-Core terms: config mapping and state-dict renaming.

Supported families: GPT-2, and the Llama family with its close relatives (Mistral's sliding
window, Qwen2's qkv bias, StableLM's partial rotary and LayerNorm), which share Llama's
parameter names, and their mixtures of experts (Mixtral; Qwen2-MoE with its shared expert;
Qwen3-MoE and OLMoE, which normalise q and k: per head, and across a token's heads),
read in the per-expert layout published checkpoints use (`block_sparse_moe.experts.E.w1/w2/w3`,
`mlp.experts.E.gate_proj/up_proj/down_proj`) or transformers' fused in-memory one. Full tensors come out in Megatron-Core's full-tensor layout:

- `linear_qkv`: rows grouped per query group — that group's query heads, then its key head,
  then its value head — so a contiguous row range is whole groups (one rank's share).
- gated `linear_fc1`: all gate rows, then all up rows.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from tpserve.model.builder import GPTModelConfig
from tpserve.model.config import ACTIVATIONS, TransformerConfig

LLAMA_LIKE = ("llama", "mistral", "qwen2", "stablelm", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SUPPORTED = ("gpt2", *LLAMA_LIKE)

_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def _rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """rope settings from either transformers 5 (`rope_parameters`) or 4 (`rope_theta`, `rope_scaling`)."""
    params = dict(hf.get("rope_parameters") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    if "partial_rotary_factor" in hf:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    return params


def gpt_config_from_hf(hf: Mapping[str, Any] | Any, params_dtype: torch.dtype = torch.float32) -> GPTModelConfig:
    """A `GPTModelConfig` for a Hugging Face config (a dict from config.json, or a PretrainedConfig)."""
    if not isinstance(hf, Mapping):
        hf = hf.to_dict()
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return _gpt2_config(hf, params_dtype)
    if model_type in LLAMA_LIKE:
        return _llama_config(hf, params_dtype)
    raise ValueError(f"Hugging Face model_type={model_type!r} is not supported; supported: {list(SUPPORTED)}")


def _gpt2_config(hf: Mapping[str, Any], params_dtype: torch.dtype) -> GPTModelConfig:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ValueError(f"GPT-2 config sets {flag}=True, which tpserve does not implement")
    if hf.get("scale_attn_weights") is False:
        raise ValueError("GPT-2 config sets scale_attn_weights=False, which tpserve does not implement")
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        raise ValueError(f"GPT-2 activation_function={act!r} is not one of {sorted(_GPT2_ACTIVATIONS)}")
    hidden = hf["n_embd"]
    transformer = TransformerConfig(
        num_layers=hf["n_layer"],
        hidden_size=hidden,
        num_attention_heads=hf["n_head"],
        ffn_hidden_size=hf.get("n_inner") or 4 * hidden,
        normalization="LayerNorm",
        layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        activation_func=ACTIVATIONS[_GPT2_ACTIVATIONS[act]],
        add_bias_linear=True,
        params_dtype=params_dtype,
    )
    return GPTModelConfig(
        transformer=transformer,
        vocab_size=hf["vocab_size"],
        should_pad_vocab=True,
        seq_length=hf["n_positions"],
        share_embeddings_and_output_weights=hf.get("tie_word_embeddings", True),
        position_embedding_type="learned_absolute",
    )


def _llama_config(hf: Mapping[str, Any], params_dtype: torch.dtype) -> GPTModelConfig:
    model_type = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{model_type} hidden_act={hf.get('hidden_act')!r}: only 'silu' (SwiGLU) is supported")
    if hf.get("mlp_bias"):
        raise ValueError(f"{model_type} config sets mlp_bias=True, which has no Megatron-Core equivalent here")
    if hf.get("attention_bias"):
        # Llama's attention_bias also puts a bias on o_proj, unlike Megatron's add_qkv_bias.
        raise ValueError(f"{model_type} config sets attention_bias=True (bias on o_proj), which is not supported")
    if hf.get("qk_layernorm"):  # StableLM's: a weight per head, unlike Qwen3's shared one
        raise ValueError(f"{model_type} config sets qk_layernorm=True, which is not supported")
    if hf.get("clip_qkv") is not None:
        raise ValueError(f"{model_type} config sets clip_qkv={hf['clip_qkv']}, which is not supported")
    if hf.get("use_parallel_residual"):
        raise ValueError(f"{model_type} config sets use_parallel_residual=True, which is not supported")
    rope = _rope_parameters(hf)
    interpolation = None
    if rope["rope_type"] == "linear":
        interpolation = float(rope["factor"])
    elif rope["rope_type"] != "default":
        raise ValueError(f"{model_type} rope_type={rope['rope_type']!r} is not supported (default, linear)")

    window = None
    if model_type in ("mistral", "mixtral") and hf.get("sliding_window"):
        # Hugging Face lets a query see the `sliding_window` latest positions, itself included.
        window = (hf["sliding_window"] - 1, 0)
    if model_type in ("qwen2", "qwen2_moe") and hf.get("use_sliding_window"):
        raise ValueError(f"{model_type} use_sliding_window=True applies to some layers only, which is not supported")

    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    transformer = TransformerConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        kv_channels=hf.get("head_dim") or hidden // heads,
        normalization="LayerNorm" if model_type == "stablelm" else "RMSNorm",
        layernorm_epsilon=hf.get("layer_norm_eps") if model_type == "stablelm" else hf.get("rms_norm_eps", 1e-6),
        gated_linear_unit=True,
        activation_func=ACTIVATIONS["silu"],
        add_bias_linear=False,
        add_qkv_bias=model_type in ("qwen2", "qwen2_moe") or bool(hf.get("use_qkv_bias")),
        window_size=window,
        qk_layernorm={"qwen3_moe": "per_head", "olmoe": "across_heads"}.get(model_type),
        params_dtype=params_dtype,
        **_moe_fields(hf),
    )
    return GPTModelConfig(
        transformer=transformer,
        vocab_size=hf["vocab_size"],
        should_pad_vocab=True,
        seq_length=hf["max_position_embeddings"],
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_percent=float(rope.get("partial_rotary_factor", 1.0)),
        rotary_base=float(rope["rope_theta"]),
        seq_len_interpolation_factor=interpolation,
    )


def _moe_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """TransformerConfig's MoE fields from a Mixtral or Qwen2-MoE config (none for dense models).
    Router jitter and the auxiliary loss are training settings: inference ignores them, as
    Megatron's does."""
    model_type = hf["model_type"]
    experts = hf.get("num_local_experts") or hf.get("num_experts")  # the name differs by family and version
    if model_type == "mixtral":
        # softmax over all experts, top k, renormalised: the softmax of the top-k logits
        return dict(num_moe_experts=experts, moe_router_topk=hf["num_experts_per_tok"],
                    moe_ffn_hidden_size=hf["intermediate_size"], moe_router_pre_softmax=False)
    if model_type == "olmoe":
        return dict(num_moe_experts=experts, moe_router_topk=hf["num_experts_per_tok"],
                    moe_ffn_hidden_size=hf["intermediate_size"],
                    moe_router_pre_softmax=not hf.get("norm_topk_prob", False))
    if model_type in ("qwen2_moe", "qwen3_moe"):
        layers, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step") or 1
        dense = set(hf.get("mlp_only_layers") or ())
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
        return dict(num_moe_experts=experts, moe_router_topk=hf["num_experts_per_tok"],
                    moe_ffn_hidden_size=hf["moe_intermediate_size"],
                    moe_shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or None,
                    moe_shared_expert_gate=bool(hf.get("shared_expert_intermediate_size")),
                    moe_router_pre_softmax=not hf.get("norm_topk_prob", False), moe_layer_freq=pattern)
    return {}


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: TransformerConfig) -> torch.Tensor:
    """[q; k; v] projections (weights [*, h] or biases [*]) -> Megatron's per-group linear_qkv.

    q has n*d rows, k and v g*d each; the result has, for each group i: q rows of its n/g
    heads, then k_i, then v_i.
    """
    g, d = config.num_query_groups, config.kv_channels
    rest = q.shape[1:]
    q = q.reshape(g, config.num_heads_per_group * d, *rest)  # [g, n/g*d, ...]
    k = k.reshape(g, d, *rest)  # [g, d, ...]
    v = v.reshape(g, d, *rest)
    return torch.cat((q, k, v), dim=1).reshape(-1, *rest)  # [(n + 2g) * d, ...]


def megatron_state_dict_from_hf(hf_state: Mapping[str, torch.Tensor], config: GPTModelConfig) -> dict[str, torch.Tensor]:
    """Full tensors under Megatron-Core names, from a Hugging Face state dict of a supported family."""
    if config.position_embedding_type == "learned_absolute":
        return _from_gpt2(hf_state, config)
    return _from_llama(hf_state, config)


def _take(hf_state: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in hf_state:
        raise ValueError(f"Hugging Face state dict has no tensor {name!r}")
    return hf_state[name]


def _from_gpt2(hf_state: Mapping[str, torch.Tensor], config: GPTModelConfig) -> dict[str, torch.Tensor]:
    tc = config.transformer
    prefix = "transformer." if any(k.startswith("transformer.") for k in hf_state) else ""
    get = lambda name: _take(hf_state, prefix + name)  # noqa: E731
    out = {
        "embedding.word_embeddings.weight": get("wte.weight"),
        "embedding.position_embeddings.weight": get("wpe.weight"),
        "decoder.final_layernorm.weight": get("ln_f.weight"),
        "decoder.final_layernorm.bias": get("ln_f.bias"),
    }
    for i in range(tc.num_layers):
        src, dst = f"h.{i}.", f"decoder.layers.{i}."
        # GPT-2's Conv1D stores weights as [in, out]; Megatron's linear layers as [out, in].
        qkv_w = get(src + "attn.c_attn.weight").t()  # [3h, h] = [q; k; v]
        qkv_b = get(src + "attn.c_attn.bias")
        out |= {
            dst + "input_layernorm.weight": get(src + "ln_1.weight"),
            dst + "input_layernorm.bias": get(src + "ln_1.bias"),
            dst + "self_attention.linear_qkv.weight": fuse_qkv(*qkv_w.chunk(3), tc),
            dst + "self_attention.linear_qkv.bias": fuse_qkv(*qkv_b.chunk(3), tc),
            dst + "self_attention.linear_proj.weight": get(src + "attn.c_proj.weight").t(),
            dst + "self_attention.linear_proj.bias": get(src + "attn.c_proj.bias"),
            dst + "pre_mlp_layernorm.weight": get(src + "ln_2.weight"),
            dst + "pre_mlp_layernorm.bias": get(src + "ln_2.bias"),
            dst + "mlp.linear_fc1.weight": get(src + "mlp.c_fc.weight").t(),
            dst + "mlp.linear_fc1.bias": get(src + "mlp.c_fc.bias"),
            dst + "mlp.linear_fc2.weight": get(src + "mlp.c_proj.weight").t(),
            dst + "mlp.linear_fc2.bias": get(src + "mlp.c_proj.bias"),
        }
    if not config.share_embeddings_and_output_weights:
        out["output_layer.weight"] = _take(hf_state, "lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}


def _from_llama(hf_state: Mapping[str, torch.Tensor], config: GPTModelConfig) -> dict[str, torch.Tensor]:
    tc = config.transformer
    get = lambda name: _take(hf_state, name)  # noqa: E731
    layer_norm = tc.normalization == "LayerNorm"
    out = {
        "embedding.word_embeddings.weight": get("model.embed_tokens.weight"),
        "decoder.final_layernorm.weight": get("model.norm.weight"),
    }
    if layer_norm:
        out["decoder.final_layernorm.bias"] = get("model.norm.bias")
    for i in range(tc.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = src + "self_attn."
        out |= {
            dst + "input_layernorm.weight": get(src + "input_layernorm.weight"),
            dst + "self_attention.linear_qkv.weight": fuse_qkv(
                get(attn + "q_proj.weight"), get(attn + "k_proj.weight"), get(attn + "v_proj.weight"), tc
            ),
            dst + "self_attention.linear_proj.weight": get(attn + "o_proj.weight"),
            dst + "pre_mlp_layernorm.weight": get(src + "post_attention_layernorm.weight"),
        }
        if tc.is_moe_layer(i):
            out |= _moe_layer(hf_state, src, dst + "mlp.", tc)
        else:
            out |= {
                dst + "mlp.linear_fc1.weight": torch.cat((get(src + "mlp.gate_proj.weight"),
                                                          get(src + "mlp.up_proj.weight"))),
                dst + "mlp.linear_fc2.weight": get(src + "mlp.down_proj.weight"),
            }
        if layer_norm:
            out[dst + "input_layernorm.bias"] = get(src + "input_layernorm.bias")
            out[dst + "pre_mlp_layernorm.bias"] = get(src + "post_attention_layernorm.bias")
        if tc.qk_layernorm is not None:
            out[dst + "self_attention.q_layernorm.weight"] = get(attn + "q_norm.weight")
            out[dst + "self_attention.k_layernorm.weight"] = get(attn + "k_norm.weight")
        if tc.add_qkv_bias:
            out[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(
                get(attn + "q_proj.bias"), get(attn + "k_proj.bias"), get(attn + "v_proj.bias"), tc
            )
    if not config.share_embeddings_and_output_weights:
        out["output_layer.weight"] = get("lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}


def _moe_layer(hf_state: Mapping[str, torch.Tensor], src: str, dst: str, tc: TransformerConfig
               ) -> dict[str, torch.Tensor]:
    """A MoE layer's router, experts (fc1 = [gate; up]) and shared expert, Megatron-Core's names."""
    get = lambda name: _take(hf_state, name)  # noqa: E731
    block = src + ("block_sparse_moe." if src + "block_sparse_moe.gate.weight" in hf_state else "mlp.")
    out = {dst + "router.weight": get(block + "gate.weight")}
    fused = block + "experts.gate_up_proj"  # transformers 5's in-memory layout: [E, 2f, h], [E, h, f]
    for e in range(tc.num_moe_experts):
        expert = f"{dst}experts.local_experts.{e}."
        if fused in hf_state:
            fc1, fc2 = get(fused)[e], get(block + "experts.down_proj")[e]
        elif block + f"experts.{e}.w1.weight" in hf_state:  # Mixtral: w1 gate, w3 up, w2 down
            fc1 = torch.cat((get(block + f"experts.{e}.w1.weight"), get(block + f"experts.{e}.w3.weight")))
            fc2 = get(block + f"experts.{e}.w2.weight")
        else:
            fc1 = torch.cat((get(block + f"experts.{e}.gate_proj.weight"), get(block + f"experts.{e}.up_proj.weight")))
            fc2 = get(block + f"experts.{e}.down_proj.weight")
        out |= {expert + "linear_fc1.weight": fc1, expert + "linear_fc2.weight": fc2}
    if tc.moe_shared_expert_intermediate_size:
        shared = block + "shared_expert."
        out |= {
            dst + "shared_experts.linear_fc1.weight": torch.cat((get(shared + "gate_proj.weight"),
                                                                 get(shared + "up_proj.weight"))),
            dst + "shared_experts.linear_fc2.weight": get(shared + "down_proj.weight"),
        }
        if tc.moe_shared_expert_gate:
            out[dst + "shared_experts.gate_weight"] = get(block + "shared_expert_gate.weight")
    return out
