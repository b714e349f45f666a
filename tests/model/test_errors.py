"""Bad configs and bad weights fail at once, with a message naming the field or tensor."""

from __future__ import annotations

import pytest
import torch
from helpers import build, converted, random_hf_model

from tpserve.model.builder import GPTModelBuilder, GPTModelConfig
from tpserve.model.checkpoint.hf import gpt_config_from_hf, megatron_state_dict_from_hf
from tpserve.model.checkpoint.load import load_weights
from tpserve.model.checkpoint.sources import DictSource
from tpserve.model.config import TransformerConfig
from tpserve.model.core_attention import AttentionBackend
from tpserve.model.parallel_state import ParallelState


def tc(**overrides) -> TransformerConfig:
    fields = dict(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=96)
    return TransformerConfig(**(fields | overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tensor_model_parallel_size=3), "num_attention_heads=8 is not divisible by tensor_model_parallel_size=3"),
        (dict(num_query_groups=3), "num_attention_heads=8 is not divisible by num_query_groups=3"),
        (dict(num_query_groups=2, tensor_model_parallel_size=4), "num_query_groups=2 is not divisible by tensor_model_parallel_size=4"),
        (dict(ffn_hidden_size=90, tensor_model_parallel_size=4), "ffn_hidden_size=90 is not divisible"),
        (dict(hidden_size=66), "hidden_size=66 is not divisible by num_attention_heads=8; set kv_channels"),
        (dict(normalization="BatchNorm"), "normalization='BatchNorm'"),
        (dict(num_layers=0), "num_layers=0 must be a positive integer"),
        (dict(window_size=(4, 4)), "window_size=(4, 4) is not a causal window"),
        (dict(layernorm_epsilon=0.0), "layernorm_epsilon=0.0 must be > 0"),
    ],
)
def test_bad_transformer_config(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tc(**overrides)


def test_bad_gpt_config():
    with pytest.raises(ValueError, match="rotary_percent=1.5 must be in"):
        GPTModelConfig(transformer=tc(), vocab_size=100, rotary_percent=1.5)
    with pytest.raises(ValueError, match="vocab_size=0 must be positive"):
        GPTModelConfig(transformer=tc(), vocab_size=0)
    with pytest.raises(ValueError, match="kv_channels=8 \\* rotary_percent=0.1 gives 0 rotary channels"):
        GPTModelBuilder(GPTModelConfig(transformer=tc(), vocab_size=100, position_embedding_type="rope",
                                       rotary_percent=0.1)).build_model()


def test_tensor_parallel_size_that_does_not_divide_the_heads():
    config = GPTModelConfig(transformer=tc(num_attention_heads=9, num_query_groups=3, hidden_size=72), vocab_size=100)
    with pytest.raises(ValueError, match="num_attention_heads=9 is not divisible by tensor_model_parallel_size=2"):
        config.with_tensor_parallel_size(2)


def test_triton_backend_on_cpu_tensors_without_the_interpreter(llama):
    """The Triton backend builds anywhere; run on CPU tensors outside Triton's interpreter it
    names the fix instead of Triton's "0 active drivers"."""
    from triton.runtime.interpreter import InterpretedFunction

    from tpserve.kernels.rope import _rope_kernel

    if isinstance(_rope_kernel, InterpretedFunction):
        pytest.skip("this process runs Triton's interpreter (tests/kernels covers that case)")
    config, state = llama
    model = GPTModelBuilder(config).build_model(attention_backend=AttentionBackend.TRITON)
    load_weights(model, DictSource(state), ParallelState())
    with pytest.raises(RuntimeError, match="need the interpreter: set TRITON_INTERPRET=1 .* or use AttentionBackend.TORCH"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None])


@pytest.fixture(scope="module")
def llama():
    return converted(random_hf_model("llama_gqa"))


def test_missing_tensor_is_named(llama):
    config, state = llama
    state = dict(state)
    del state["decoder.layers.1.pre_mlp_layernorm.weight"]
    with pytest.raises(ValueError, match=r"missing tensors: \['decoder.layers.1.pre_mlp_layernorm.weight'\]"):
        build(config, state)


def test_wrong_shape_is_named(llama):
    config, state = llama
    state = dict(state)
    state["decoder.layers.0.self_attention.linear_qkv.weight"] = torch.zeros(100, 64)
    with pytest.raises(ValueError, match=r"decoder.layers.0.self_attention.linear_qkv.weight: stored shape \[100, 64\], "
                                         r"the model needs \[128, 64\]"):
        build(config, state)


def test_unexpected_tensor_is_named(llama):
    config, state = llama
    with pytest.raises(ValueError, match=r"no parameter for: \['decoder.layers.0.mlp.linear_fc1.bias'\]"):
        build(config, state | {"decoder.layers.0.mlp.linear_fc1.bias": torch.zeros(192)})


def test_too_few_vocabulary_rows(llama):
    config, state = llama
    state = state | {"embedding.word_embeddings.weight": state["embedding.word_embeddings.weight"][:300]}
    with pytest.raises(ValueError, match=r"embedding.word_embeddings.weight: stored shape \[300, 64\]"):
        build(config, state)


def test_nothing_is_loaded_when_anything_is_wrong(llama):
    """All checks run before any copy: a failed load leaves the model untouched."""
    config, state = llama
    model = GPTModelBuilder(config).build_model()
    for p in model.parameters():
        p.fill_(7.0)
    state = dict(state)
    del state["output_layer.weight"]
    with pytest.raises(ValueError, match="output_layer.weight"):
        load_weights(model, DictSource(state), ParallelState())
    assert all(bool((p == 7.0).all()) for p in model.parameters())


def test_hf_errors():
    with pytest.raises(ValueError, match="model_type='bert' is not supported"):
        gpt_config_from_hf({"model_type": "bert"})
    hf = random_hf_model("gpt2")
    config = gpt_config_from_hf(hf.config)
    state = dict(hf.state_dict())
    del state["transformer.h.1.attn.c_attn.bias"]
    with pytest.raises(ValueError, match="no tensor 'transformer.h.1.attn.c_attn.bias'"):
        megatron_state_dict_from_hf(state, config)
    with pytest.raises(ValueError, match="attention_bias=True"):
        gpt_config_from_hf(dict(random_hf_model("llama_gqa").config.to_dict(), attention_bias=True))


def test_attention_mask_and_labels_are_refused(llama):
    model = build(*llama)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask=None"):
        model(ids, torch.arange(4)[None], attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        model(ids, torch.arange(4)[None], labels=ids)
