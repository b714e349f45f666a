"""Mixtures of experts served by the engine (random Mixtral, Qwen3-MoE with its q/k norms, and
Qwen2-MoE with a shared expert and dense and MoE layers interleaved), 16 prompts arriving 2 per
step: the same greedy tokens as transformers' `generate`, at TP 1 and TP 2 (each rank holding its
slices of every expert)."""

from __future__ import annotations

import pytest
from helpers import random_checkpoint
from test_llm_engine import GREEDY, hf_greedy, make_engine, prompts, run


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe", "qwen2_moe"])
def moe_ckpt(request, tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("moe"), case=request.param)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_moe_model_batches_like_hugging_face(moe_ckpt, tp):
    engine = make_engine(moe_ckpt[0], tensor_parallel_size=tp)
    try:
        batched = run(engine, [(p, GREEDY) for p in prompts()], per_step=2)
    finally:
        engine.shutdown()
    for prompt, out in zip(prompts(), batched):
        reference, trusted = hf_greedy(moe_ckpt[1], prompt, 16)
        assert out.outputs[0].token_ids[:trusted] == reference[:trusted]
