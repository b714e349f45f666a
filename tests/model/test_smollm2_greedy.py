"""The real default model: SmolLM2-135M-Instruct from its GGUF, greedy, against transformers.

tests/fixtures/smollm2_greedy.json holds transformers' own greedy tokens for each prompt
(written by tests/fixtures/make_smollm2_goldens.py, with transformers' GGUF loader); only
prompts whose smallest top-1/top-2 logit gap is >= 1e-3 are kept, so exact equality is fair.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import build, greedy_decode

from tpserve.model.checkpoint.gguf import default_gguf_path, read_gguf
from tpserve.model.checkpoint.hf import gpt_config_from_hf, megatron_state_dict_from_hf
from tpserve.model.launcher import RankContext
from tpserve.model.parallel_state import ParallelState

pytestmark = pytest.mark.slow

GOLDEN = json.loads((Path(__file__).parent.parent / "fixtures" / "smollm2_greedy.json").read_text())
LOCAL = RankContext(ParallelState())  # this process as a single rank; keeps its model across tests


def _smollm2(ctx: RankContext):
    """This rank's SmolLM2 model, read once per process and kept."""
    if "smollm2" not in ctx.state:
        gguf_model = read_gguf(default_gguf_path())
        config = gpt_config_from_hf({"model_type": "llama", **gguf_model.hf_config})
        config.parallel_output = False
        state = megatron_state_dict_from_hf(gguf_model.state_dict, config)
        ctx.state["smollm2"] = build(config, state, ctx.parallel_state)
    return ctx.state["smollm2"]


def _greedy(ctx: RankContext, prompts: list[list[int]], steps: int):
    return greedy_decode(_smollm2(ctx), prompts, steps)


@pytest.fixture(scope="module")
def tp1():
    prompts = [case["input_ids"] for case in GOLDEN["cases"]]
    return _greedy(LOCAL, prompts, GOLDEN["max_new_tokens"])


def test_config_is_smollm2():
    model = _smollm2(LOCAL)
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups) == (30, 576, 9, 3)
    assert model.unpadded_vocab_size == 49152 and model.share_embeddings_and_output_weights


def test_greedy_tokens_equal_transformers(tp1):
    tokens, _ = tp1
    for case, got in zip(GOLDEN["cases"], tokens):
        assert got == case["output_ids"], f"prompt {case['prompt']!r}"


def test_tensor_parallel_3_gives_the_same_logits_and_tokens(tp1, worker_groups):
    """9 heads and 3 query groups split over 3 ranks: one group per rank."""
    tokens, logits = tp1
    prompts = [case["input_ids"] for case in GOLDEN["cases"]]
    for tp_tokens, tp_logits in worker_groups.get(3).run(_greedy, prompts, GOLDEN["max_new_tokens"]):
        # Ranks sum partial products in another order: compare relative to the logits' scale.
        scale = logits.abs().max()
        torch.testing.assert_close(tp_logits, logits, atol=1e-5 * scale, rtol=0)
        assert tp_tokens == tokens
