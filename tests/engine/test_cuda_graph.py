"""Decode steps replayed from CUDA graphs give what eager steps give.

On the CPU no graph can be captured, so `capture_graph` is replaced by a stand-in that re-runs
the captured forward on the same static buffers at each replay: that checks everything around
the capture (the batch-size ladder, padding a step to the next size, refreshing the static
inputs, picking the logits rows, falling back to eager for prefill and oversized steps). On a
GPU (`pytest -m gpu`) the same test captures real graphs, and an `LLM` with graphs generates
the same tokens as one with `enforce_eager=True`.
"""

from __future__ import annotations

import pytest
import torch
from helpers import build, compare_runners, converted, eager_capture_stand_in, model_runner, random_hf_model

from tpserve import LLM, SamplingParams
from tpserve.engine import cuda_graph
from tpserve.engine.cuda_graph import cuda_graph_batch_sizes

# Six prompts prefilled together, then decode steps of 6, 3, 1 and 6 sequences (padded to 8,
# 4, 1 and 8), a step mixing a new prompt with decodes (eager), decodes of 7 (padded to 8),
# and with a 4-size ladder a step of 7 is too big for any graph (eager). Two contexts pass
# 2 * MIN_SPLIT_KEYS, so on a GPU the graphs' frozen decode splits really merge several.
PROMPT_LENS = [300, 11, 520, 8, 1, 6, 9]
STEPS = [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [0, 2, 4], [1], [0, 1, 2, 3, 4, 5], [6, 0, 1], [0, 1, 2, 3, 4, 5, 6],
         [0, 1, 2, 3, 4, 5, 6]]


def test_batch_size_ladder():
    assert cuda_graph_batch_sizes(1) == [1]
    assert cuda_graph_batch_sizes(3) == [1, 2, 3]
    assert cuda_graph_batch_sizes(8) == [1, 2, 4, 8]
    assert cuda_graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert cuda_graph_batch_sizes(256) == [1, 2, 4, *range(8, 257, 8)]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a GPU")
    return request.param


def _twin_models(device: str):
    config, state = converted(random_hf_model("llama_gqa", seed=3, max_position_embeddings=1024))
    return [build(config, state, device=device) for _ in range(2)]


def _prompts() -> dict[int, list[int]]:
    gen = torch.Generator().manual_seed(4)
    return {i: torch.randint(0, 301, (n,), generator=gen).tolist() for i, n in enumerate(PROMPT_LENS)}


@pytest.mark.parametrize("sizes,replayed", [([1, 2, 4, 8], [8, 4, 1, 8, 8, 8]), ([1, 2, 4], [4, 1])])
def test_decode_steps_replay_padded_graphs(device, monkeypatch, sizes, replayed):
    replays: list[int] = []
    if device == "cpu":
        monkeypatch.setattr(cuda_graph, "capture_graph", eager_capture_stand_in(replays))
    eager_model, graphed_model = _twin_models(device)
    eager = model_runner(eager_model, device, num_blocks=512)
    graphed = model_runner(graphed_model, device, cuda_graph_batch_sizes=sizes, num_blocks=512)
    assert sorted(graphed.graphs._replays) == sizes
    tol = dict(rtol=1e-4, atol=1e-5) if device == "cpu" else dict(rtol=2e-3, atol=2e-3)  # TF32 on the GPU
    compare_runners(eager, graphed, STEPS, _prompts(), **tol)
    if device == "cpu":
        # The first step and the mixed one are prefills, eager; past the ladder's top, eager too.
        assert replays == replayed


@pytest.mark.gpu
def test_llm_with_cuda_graphs_generates_as_eager(random_ckpt):
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a GPU")
    path, _ = random_ckpt
    # 11 sequences (the 16-graph pads them), 149-219 prompt tokens: the graphs of a 256-token
    # max_model_len freeze 2 decode splits, both holding keys here.
    prompts = [list(range(1 + i, 150 + 7 * i)) for i in range(11)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = []
    for eager in (False, True):
        with LLM(path, device="cuda", dtype=torch.float32, max_num_seqs=16, enforce_eager=eager) as llm:
            outputs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    assert outputs[0] == outputs[1]


class _HostSync(AssertionError):
    pass


def _forbidding_host_syncs(forward):
    """`forward` run with every way a step could read a device value on the host refused."""
    def guarded():
        def refuse(*args, **kwargs):
            raise _HostSync("a host sync in a captured decode step")

        saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "nonzero", "__bool__")}
        saved_nonzero = torch.nonzero
        try:
            for name in saved:
                setattr(torch.Tensor, name, refuse)
            torch.nonzero = refuse
            return forward()
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)
            torch.nonzero = saved_nonzero
    return guarded


def test_a_mixture_of_experts_decode_step_has_no_host_sync(monkeypatch):
    """A MoE model's decode steps as GPU workers run them (experts dispatched densely, what the
    builder picks on CUDA) replay through the capture stand-in with .tolist(), .item(),
    .nonzero() and truth tests refused, and give the eager (grouped) model's samples. The
    grouped dispatch, which reads expert counts on the host, trips the same guard."""
    from tpserve.model.moe import MoELayer

    replays: list[int] = []

    def capture(forward, pool):
        guarded = _forbidding_host_syncs(forward)
        guarded()
        return lambda: (replays.append(forward.args[0]), guarded()), pool

    monkeypatch.setattr(cuda_graph, "capture_graph", capture)
    config, state = converted(random_hf_model("mixtral", seed=3, max_position_embeddings=1024))
    eager_model, graphed_model = (build(config, state) for _ in range(2))
    for m in graphed_model.modules():
        if isinstance(m, MoELayer):
            m.dispatch = "dense"
    eager = model_runner(eager_model, num_blocks=512)
    graphed = model_runner(graphed_model, cuda_graph_batch_sizes=[1, 2, 4, 8], num_blocks=512)
    compare_runners(eager, graphed, STEPS, _prompts(), rtol=1e-4, atol=1e-5)
    assert replays == [8, 4, 1, 8, 8, 8]

    grouped = next(m for m in eager_model.modules() if isinstance(m, MoELayer))
    with pytest.raises(_HostSync):
        _forbidding_host_syncs(lambda: grouped(torch.randn(3, config.transformer.hidden_size)))()
