"""The same logits at pipeline_model_parallel_size 2, alone and with TP 2: stages are processes
joined by gloo, hidden states go stage to stage by send/recv.

Every rank builds its stage from the same full tensors (reading only its own layers' slices),
runs the same steps through its own stage's paged KV cache; the last stage's ranks compute the
logits, compared with one process holding the whole model.
"""

from __future__ import annotations

import pytest
import torch
from helpers import PagedStepper, build, converted, random_hf_model

from tpserve.model.launcher import RankContext
from tpserve.model.parallel_state import ParallelState
from tpserve.model.pipeline_parallel import forward_step

CASES = ["gpt2", "llama_gqa"]  # tied embeddings (the last stage keeps a copy) and untied


def _run_scenario(ctx: RankContext, config, state, tokens: list[list[int]]) -> dict | None:
    """Runs on every rank: a whole-sequence forward, then prefill + decode + a mixed step.
    None on ranks of a stage before the last."""
    ps = ctx.parallel_state
    model = build(config, state, ps)
    with torch.no_grad():
        whole = forward_step(model, torch.tensor(tokens), torch.arange(len(tokens[0])).expand(len(tokens), -1), ps)
    stepper = PagedStepper(model, parallel_state=ps)
    a, b = tokens
    steps = [stepper.step([("a", a[:6]), ("b", b[:3])])]
    for p in range(6, 10):
        steps.append(stepper.step([("a", [a[p]]), ("b", b[p - 3 : p - 1])]))
    if whole is None:
        assert all(s is None for s in steps)
        return None
    return {"whole": whole, "steps": torch.cat([torch.cat(s) for s in steps])}


@pytest.fixture(scope="module", params=CASES)
def case(request):
    config, state = converted(random_hf_model(request.param, num_hidden_layers=4))
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5)).tolist()
    return config, state, tokens, _run_scenario(RankContext(ParallelState()), config, state, tokens)


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 2)])
def test_same_logits_through_the_pipeline(case, tp, pp, worker_groups):
    config, state, tokens, reference = case
    results = worker_groups.get(tp, pp).run(_run_scenario, config, state, tokens)
    last_stage = (pp - 1) * tp
    assert all(r is None for r in results[:last_stage])
    for rank, result in enumerate(results[last_stage:], start=last_stage):
        for key in ("whole", "steps"):
            torch.testing.assert_close(result[key], reference[key], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"rank {rank} of TP {tp} x PP {pp}, {key}: {m}")


def _stage_holdings(ctx: RankContext, config, state) -> tuple[int, int]:
    model = build(config, state, ctx.parallel_state)
    return ctx.parallel_state.pipeline_model_parallel_rank, sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("case_name", ["gpt2", "llama_gqa"])
def test_each_stage_holds_only_its_own_parameters(case_name, worker_groups):
    """4 layers at PP 2: stage 0 the embedding and layers 0-1, stage 1 layers 2-3, the final norm
    and the output layer (for tied embeddings, its own copy of the word embeddings). Sizes are
    the whole model's parameters (vocabulary padded as served), split by name."""
    config, state = converted(random_hf_model(case_name, num_hidden_layers=4))
    whole = dict(build(config, state).named_parameters())

    def nbytes(names):
        return sum(whole[n].numel() * whole[n].element_size() for n in names)

    def in_layers(name, layers):
        return name.startswith("decoder.layers.") and int(name.split(".")[2]) in layers

    first = [n for n in whole if n.startswith("embedding.") or in_layers(n, (0, 1))]
    last = [n for n in whole if n.startswith(("decoder.final_layernorm.", "output_layer.")) or in_layers(n, (2, 3))]
    assert sorted(first + last) == sorted(whole)
    tied = config.share_embeddings_and_output_weights
    assert tied == (case_name == "gpt2") and ("output_layer.weight" in whole) != tied
    expected = {0: nbytes(first), 1: nbytes(last) + (nbytes(["embedding.word_embeddings.weight"]) if tied else 0)}
    held = dict(worker_groups.get(1, 2).run(_stage_holdings, config, state))
    assert held == expected
