"""Continuous batching at TP > 1: a random model at TP 2, and SmolLM2 at TP 1 and 3 against
transformers' own greedy tokens (tests/fixtures/smollm2_greedy.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ENGINE_PINS
from test_llm_engine import GREEDY, hf_greedy, make_engine, prompts, run

from tpserve.engine.config import EngineConfig
from tpserve.engine.llm_engine import LLMEngine
from tpserve.engine.sampling_params import SamplingParams
from tpserve.model.checkpoint import prepare_default_model

pytestmark = pytest.mark.slow
GOLDEN = json.loads((Path(__file__).parent.parent / "fixtures" / "smollm2_greedy.json").read_text())


def test_random_model_at_tp2_batches_like_hugging_face(random_ckpt):
    engine = make_engine(random_ckpt[0], tensor_parallel_size=2)
    try:
        batched = run(engine, [(p, GREEDY) for p in prompts()], per_step=2)
        for prompt, out in list(zip(prompts(), batched)):
            reference, trusted = hf_greedy(random_ckpt[1], prompt, 16)
            assert out.outputs[0].token_ids[:trusted] == reference[:trusted]
        for i in (0, 7):
            assert run(engine, [(prompts()[i], GREEDY)])[0].outputs[0].token_ids == batched[i].outputs[0].token_ids
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def smollm2():
    return prepare_default_model()


@pytest.mark.parametrize("tp", [1, 3])
def test_smollm2_continuous_batching_gives_transformers_tokens(smollm2, tp):
    """16 prompts arriving 2 per step; each gap >= 1e-3 in the reference, so equality is exact."""
    cases = GOLDEN["cases"]
    assert len(cases) >= 16
    params = SamplingParams(temperature=0.0, max_tokens=GOLDEN["max_new_tokens"], ignore_eos=True)
    engine = LLMEngine(EngineConfig(smollm2, tensor_parallel_size=tp, kv_cache_memory=96 << 20, max_model_len=512,
                                    max_num_batched_tokens=512, **ENGINE_PINS))
    try:
        outs = run(engine, [(c["input_ids"], params) for c in cases[:16]], per_step=2)
        for case, out in zip(cases, outs):
            assert out.outputs[0].token_ids == case["output_ids"], case["prompt"]
        if tp == 1:
            for case in cases[:3]:
                assert run(engine, [(case["input_ids"], params)])[0].outputs[0].token_ids == case["output_ids"]
    finally:
        engine.shutdown()


def test_smollm2_in_bfloat16_gives_transformers_bfloat16_tokens(smollm2):
    """Served in bf16 (weights, activations, KV cache), batched: the tokens transformers' dense
    bf16 model decided by a clear margin (tests/fixtures/make_smollm2_goldens.py --dtype bfloat16)."""
    golden = json.loads((Path(__file__).parent.parent / "fixtures" / "smollm2_greedy_bfloat16.json").read_text())
    cases = golden["cases"][:8]
    assert sum(c["trusted_tokens"] for c in cases) >= 48
    params = SamplingParams(temperature=0.0, max_tokens=golden["max_new_tokens"], ignore_eos=True)
    engine = LLMEngine(EngineConfig(smollm2, kv_cache_memory=32 << 20, max_model_len=512,
                                    **(ENGINE_PINS | {"dtype": torch.bfloat16})))
    try:
        outs = run(engine, [(c["input_ids"], params) for c in cases])
    finally:
        engine.shutdown()
    for case, out in zip(cases, outs):
        n = case["trusted_tokens"]
        assert out.outputs[0].token_ids[:n] == case["output_ids"][:n], case["prompt"]
