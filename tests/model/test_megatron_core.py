"""GPTModel gives Megatron-Core's own logits for the same weights.

The fixtures are written by tests/fixtures/make_megatron_goldens.py, which runs NVIDIA's
megatron-core GPTModel (local spec, CPU, fp32) with random weights, norms and biases set away
from 1 and 0 so a loader that drops one fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import build

from tpserve.model.builder import GPTModelConfig
from tpserve.model.config import ACTIVATIONS, TransformerConfig
from tpserve.model.launcher import RankContext
from tpserve.model.parallel_state import ParallelState

FIXTURES = Path(__file__).parent.parent / "fixtures" / "megatron"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def load_fixture(name: str) -> tuple[GPTModelConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    fields = dict(meta["transformer"])
    fields["activation_func"] = ACTIVATIONS[fields.pop("activation")]
    gpt = meta["gpt"]
    config = GPTModelConfig(
        transformer=TransformerConfig(**fields),
        vocab_size=gpt["vocab_size"],
        seq_length=gpt["max_sequence_length"],
        parallel_output=False,
        share_embeddings_and_output_weights=gpt["share_embeddings_and_output_weights"],
        position_embedding_type=gpt["position_embedding_type"],
        rotary_percent=gpt["rotary_percent"],
        rotary_base=gpt["rotary_base"],
        seq_len_interpolation_factor=gpt["seq_len_interpolation_factor"],
    )
    arrays = np.load(FIXTURES / f"{name}.npz")
    state = {k: torch.from_numpy(arrays[k]) for k in arrays.files if not k.startswith("__")}
    golden = {k.strip("_"): torch.from_numpy(arrays[k]) for k in arrays.files if k.startswith("__")}
    return config, state, golden


def _logits(ctx: RankContext, config, state, input_ids, position_ids) -> torch.Tensor:
    model = build(config, state, ctx.parallel_state)
    with torch.no_grad():
        return model(input_ids, position_ids)


def test_fixtures_exist():
    assert {"gpt2_like", "llama_like", "llama_interleaved_partial"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_megatron_core(name):
    config, state, golden = load_fixture(name)
    got = _logits(RankContext(ParallelState()), config, state, golden["input_ids"], golden["position_ids"])
    torch.testing.assert_close(got, golden["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_logits_equal_megatron_core_at_tp2(name, worker_groups):
    config, state, golden = load_fixture(name)
    for got in worker_groups.get(2).run(_logits, config, state, golden["input_ids"], golden["position_ids"]):
        torch.testing.assert_close(got, golden["logits"], atol=1e-4, rtol=1e-4)
