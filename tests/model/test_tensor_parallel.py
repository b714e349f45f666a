"""The same logits at tensor_model_parallel_size 1, 2 and 4: ranks are processes joined by gloo.

Every rank builds its shard from the same full tensors (reading only its own slices), runs
the same steps through its own paged KV cache, and gathers the logits.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import PagedStepper, build, converted, random_hf_model

from tpserve.model.launcher import RankContext
from tpserve.model.parallel_state import ParallelState

CASES = ["gpt2", "llama_gqa"]  # MHA with biases and learned positions; GQA with RoPE, untied


def _run_scenario(ctx: RankContext, config, state, tokens: list[list[int]]) -> dict[str, torch.Tensor]:
    """Runs on every rank: a whole-sequence forward, then prefill + decode + a mixed step."""
    model = build(config, state, ctx.parallel_state)
    with torch.no_grad():
        whole = model(torch.tensor(tokens), torch.arange(len(tokens[0])).expand(len(tokens), -1))
    stepper = PagedStepper(model)
    a, b = tokens
    steps = [stepper.step([("a", a[:6]), ("b", b[:3])])]
    for p in range(6, 10):
        steps.append(stepper.step([("a", [a[p]]), ("b", b[p - 3 : p - 1])]))
    return {"whole": whole, "steps": torch.cat([torch.cat(s) for s in steps])}


@pytest.fixture(scope="module", params=CASES)
def case(request):
    config, state = converted(random_hf_model(request.param))
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5)).tolist()
    return config, state, tokens, _run_scenario(RankContext(ParallelState()), config, state, tokens)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_same_logits_at_every_tp_size(case, tp, worker_groups):
    config, state, tokens, reference = case
    results = worker_groups.get(tp).run(_run_scenario, config, state, tokens)
    for rank, result in enumerate(results):
        for key in ("whole", "steps"):
            torch.testing.assert_close(result[key], reference[key], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"rank {rank} of {tp}, {key}: {m}")


def _gpt2_vocab_50257(ctx: RankContext, config, state, ids) -> torch.Tensor:
    model = build(config, state, ctx.parallel_state)
    assert model.embedding.word_embeddings.weight.shape[0] * ctx.parallel_state.tensor_model_parallel_size == config.padded_vocab_size(
        ctx.parallel_state.world_size
    )
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids))


@pytest.mark.slow
def test_gpt2_vocabulary_pads_evenly(worker_groups):
    """GPT-2's 50257 tokens split over 2 and 4 ranks; the padded logits never come out."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=32, initializer_range=0.2)
    ).eval()
    config, state = converted(hf)
    assert config.vocab_size == 50257 and config.padded_vocab_size(4) == 50688  # 128 * 4 * 99
    ids = torch.tensor([[50256, 1, 50255, 7, 50000]])
    with torch.no_grad():
        expected = hf(ids).logits
    for tp in (2, 4):
        for logits in worker_groups.get(tp).run(_gpt2_vocab_50257, config, state, ids):
            assert logits.shape == (1, 5, 50257)
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
