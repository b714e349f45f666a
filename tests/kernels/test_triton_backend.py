"""A small model gives the same logits with the Triton attention backend as with the torch one.

CPU tensors in the interpreter, fp32. Same weights in both; the whole-sequence forward, then a
paged run: a packed prefill, a step mixing a fresh prefill, a prefill chunk over a cached prefix
and a decode (the prefill kernel), then decode-only steps (the split-K decode kernel).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import PagedStepper, build, compare_runners, converted, eager_capture_stand_in, model_runner, random_hf_model

from tpserve.engine import cuda_graph
from tpserve.model.core_attention import AttentionBackend, TritonDotProductAttention

TOL = dict(rtol=1e-4, atol=1e-5)

# GQA with half rotation; partial rotary with qkv bias; a sliding window; learned positions
# (no RoPE); and Megatron's interleaved rotation (no Hugging Face model has it, so both
# backends are given the flag).
CASES = ["llama_gqa", "stablelm_partial_rotary", "mistral_sliding_window", "gpt2", "llama_gqa+interleaved"]


@pytest.fixture(scope="module", params=CASES)
def models(request):
    name, _, variant = request.param.partition("+")
    config, state = converted(random_hf_model(name))
    if variant == "interleaved":
        config = dataclasses.replace(config, transformer=dataclasses.replace(config.transformer, rotary_interleaved=True))
    torch_model = build(config, state)
    triton_model = build(config, state, attention_backend=AttentionBackend.TRITON)
    assert isinstance(triton_model.decoder.layers[0].self_attention.core_attention, TritonDotProductAttention)
    return torch_model, triton_model


def test_whole_sequence_forward(interpreter, models):
    torch_model, triton_model = models
    ids = torch.randint(0, 301, (2, 13), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(13).expand(2, 13)
    with torch.no_grad():
        torch.testing.assert_close(triton_model(ids, positions), torch_model(ids, positions), **TOL)


def test_paged_steps(interpreter, models):
    torch_model, triton_model = models
    gen = torch.Generator().manual_seed(2)
    seqs = {k: torch.randint(0, 301, (n,), generator=gen).tolist() for k, n in {"a": 9, "b": 12, "c": 5}.items()}
    steps = [
        [("a", seqs["a"][:8]), ("b", seqs["b"][:4])],  # two fresh prefills
        [("a", seqs["a"][8:]), ("b", seqs["b"][4:]), ("c", seqs["c"])],  # decode, chunk over a prefix, fresh
        [("a", [7]), ("b", [8]), ("c", [9])],  # decode only
        [("a", [10]), ("c", [11])],
    ]
    ours, theirs = PagedStepper(triton_model, seed=3), PagedStepper(torch_model, seed=3)
    for batch in steps:
        for got, want in zip(ours.step(batch), theirs.step(batch), strict=True):
            torch.testing.assert_close(got, want, **TOL)


def test_decode_steps_replayed_from_padded_graphs(interpreter, monkeypatch):
    """The Triton kernels behind `CUDAGraphRunner` (tests/engine/test_cuda_graph.py has the
    whole story): padded decode steps give the samples and cache of eager ones. In the
    interpreter no graph is captured; the stand-in re-runs the captured forward at each replay."""
    replays = []
    monkeypatch.setattr(cuda_graph, "capture_graph", eager_capture_stand_in(replays))
    config, state = converted(random_hf_model("llama_gqa", seed=3))
    eager = model_runner(build(config, state, attention_backend=AttentionBackend.TRITON))
    graphed = model_runner(build(config, state, attention_backend=AttentionBackend.TRITON), cuda_graph_batch_sizes=[2, 4])
    gen = torch.Generator().manual_seed(4)
    prompts = {i: torch.randint(0, 301, (n,), generator=gen).tolist() for i, n in enumerate([5, 2, 7])}
    compare_runners(eager, graphed, [[0, 1, 2], [0, 1, 2], [1], [0, 2]], prompts, **TOL)
    assert replays == [4, 2, 2]
