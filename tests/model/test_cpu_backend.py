"""A small model gives the same logits with the native CPU attention backend (the CPU's
default) as with the torch references, through packed prefills, a mixed step of a prefill
chunk over a cached prefix with a decode and a fresh prompt, and decode-only steps."""

from __future__ import annotations

import pytest
import torch
from helpers import PagedStepper, converted, random_hf_model

from tpserve.model.builder import GPTModelBuilder
from tpserve.model.checkpoint.load import load_weights
from tpserve.model.checkpoint.sources import DictSource
from tpserve.model.core_attention import AttentionBackend, CpuDotProductAttention, TorchDotProductAttention
from tpserve.model.parallel_state import ParallelState

TOL = dict(rtol=1e-4, atol=1e-5)


def build_with(config, state, backend: AttentionBackend):
    model = GPTModelBuilder(config).build_model(attention_backend=backend)
    load_weights(model, DictSource(state), ParallelState())
    return model


def test_the_cpu_default_is_the_native_backend():
    assert AttentionBackend.default_for("cpu") is AttentionBackend.CPU


@pytest.mark.parametrize("case", ["llama_gqa", "mistral_sliding_window", "gpt2"])
def test_paged_steps_match_the_torch_backend(case):
    config, state = converted(random_hf_model(case))
    native, reference = build_with(config, state, AttentionBackend.CPU), build_with(config, state, AttentionBackend.TORCH)
    core = native.decoder.layers[0].self_attention.core_attention
    assert type(core) is CpuDotProductAttention
    assert type(reference.decoder.layers[0].self_attention.core_attention) is TorchDotProductAttention
    gen = torch.Generator().manual_seed(2)
    seqs = {k: torch.randint(0, 301, (n,), generator=gen).tolist() for k, n in {"a": 9, "b": 30, "c": 5}.items()}
    steps = [
        [("a", seqs["a"][:8]), ("b", seqs["b"][:20])],  # two fresh prefills
        [("a", seqs["a"][8:]), ("b", seqs["b"][20:]), ("c", seqs["c"])],  # decode, chunk over a prefix, fresh
        *([("a", [7 + i]), ("b", [8 + i]), ("c", [9 + i])] for i in range(6)),  # decodes across block edges
    ]
    ours, theirs = PagedStepper(native, seed=3), PagedStepper(reference, seed=3)
    for batch in steps:
        for got, want in zip(ours.step(batch), theirs.step(batch), strict=True):
            torch.testing.assert_close(got, want, **TOL)


def test_kv_cache_memory_is_zeroed_and_outlives_its_owner():
    """On the CPU the cache lives in an anonymous mapping (asked for huge pages); layers keep
    views of it after the KVCache object is gone, so the mapping must stay with them."""
    import gc

    from tpserve.model.kv_cache import KVCache

    config, _ = converted(random_hf_model("llama_gqa"))
    cache = KVCache(config.transformer, num_blocks=64, block_size=16, dtype=torch.float32)
    k, v = cache.layer(1)
    assert k.shape == (64, 16, 4, 8) and not k.any() and not v.any()
    del cache
    gc.collect()
    k.fill_(1.0)
    v[3] = 2.0
    assert k.sum().item() == k.numel() and v.sum().item() == 2.0 * v[3].numel()
