"""Continuous batching through a pipeline: SmolLM2's 30 layers over 2 and 3 stages against
transformers' own greedy tokens (tests/fixtures/smollm2_greedy.json), and a random model at
TP 2 x PP 2 against Hugging Face."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ENGINE_PINS
from test_llm_engine import GREEDY, hf_greedy, make_engine, prompts, run

from tpserve.engine.config import EngineConfig
from tpserve.engine.llm_engine import LLMEngine
from tpserve.engine.sampling_params import SamplingParams
from tpserve.model.checkpoint import prepare_default_model

pytestmark = pytest.mark.slow
GOLDEN = json.loads((Path(__file__).parent.parent / "fixtures" / "smollm2_greedy.json").read_text())


def test_random_model_at_tp2_pp2_batches_like_hugging_face(random_ckpt):
    engine = make_engine(random_ckpt[0], tensor_parallel_size=2, pipeline_parallel_size=2)
    try:
        batched = run(engine, [(p, GREEDY) for p in prompts()], per_step=2)
        for prompt, out in zip(prompts(), batched):
            reference, trusted = hf_greedy(random_ckpt[1], prompt, 16)
            assert out.outputs[0].token_ids[:trusted] == reference[:trusted]
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def smollm2():
    return prepare_default_model()


@pytest.mark.parametrize("pp", [2, 3])
def test_smollm2_through_the_pipeline_gives_transformers_tokens(smollm2, pp):
    """16 prompts arriving 2 per step, so prefills and decodes share steps; each gap >= 1e-3 in
    the reference, so equality is exact."""
    cases = GOLDEN["cases"][:16]
    params = SamplingParams(temperature=0.0, max_tokens=GOLDEN["max_new_tokens"], ignore_eos=True)
    engine = LLMEngine(EngineConfig(smollm2, pipeline_parallel_size=pp, kv_cache_memory=96 << 20, max_model_len=512,
                                    max_num_batched_tokens=512, **ENGINE_PINS))
    try:
        outs = run(engine, [(c["input_ids"], params) for c in cases], per_step=2)
    finally:
        engine.shutdown()
    for case, out in zip(cases, outs):
        assert out.outputs[0].token_ids == case["output_ids"], case["prompt"]
