"""LLMEngine end to end on a random model: continuous batching, chunked prefill, preemption,
prefix caching, seeded sampling and n > 1, against the same request alone and Hugging Face."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import ENGINE_PINS

from tpserve.engine.config import EngineConfig
from tpserve.engine.llm_engine import LLMEngine
from tpserve.engine.outputs import RequestOutput
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.protocol import StepPlan

logger = logging.getLogger(__name__)
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def prompts(n: int = 16, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (int(torch.randint(2, 24, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def make_engine(path, **overrides) -> LLMEngine:
    fields = dict(kv_cache_memory=8 << 20, max_num_seqs=32, max_num_batched_tokens=256, max_model_len=128, **ENGINE_PINS)
    return LLMEngine(EngineConfig(path, **(fields | overrides)))


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]], per_step: int | None = None,
        plans: list[StepPlan] | None = None) -> list:
    """Run requests to the end, `per_step` arriving before each step (all at once if None); their
    whole outputs, folded from the engine's deltas."""
    if plans is not None:
        execute = engine.executor.execute
        engine.executor.execute = lambda plan, bitmask=None: (plans.append(plan), execute(plan, bitmask))[1]
    pending = [(f"r{i}", p, sp) for i, (p, sp) in enumerate(requests)]
    done = {}
    try:
        while pending or engine.has_unfinished_requests():
            for request_id, prompt, sp in pending[: per_step or len(pending)]:
                engine.add_request(request_id, prompt, sp)
            pending = pending[per_step or len(pending):]
            for delta in engine.step():
                if delta.request_id in done:
                    done[delta.request_id].add(delta)
                else:
                    done[delta.request_id] = RequestOutput.start(delta)
                # FCFS: the waiting queue stays in arrival order, preempted sequences included.
                arrivals = [s.arrival_time for s in engine.scheduler.waiting]
                assert arrivals == sorted(arrivals)
    finally:
        if plans is not None:
            engine.executor.execute = execute
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks, "blocks leaked"
    assert all(out.finished for out in done.values())
    return [done[f"r{i}"] for i in range(len(requests))]


def hf_greedy(hf_model, prompt: list[int], steps: int) -> tuple[list[int], int]:
    """Hugging Face's greedy tokens, and how many of them are decided by a clear margin: the
    reference's top-1/top-2 gap must be >= 1e-4 for exact equality to be a fair demand."""
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                            pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    trusted = steps
    for i, logits in enumerate(out.logits):
        top2 = logits[0].topk(2).values
        if top2[0] - top2[1] < 1e-4:
            trusted = i + 1  # this step's token is still compared; later ones may follow another path
            logger.info("prompt %s: reference gap %.2e at step %d", prompt[:4], float(top2[0] - top2[1]), i)
            break
    return tokens, trusted


@pytest.fixture(scope="module")
def engine(random_ckpt):
    engine = make_engine(random_ckpt[0])
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def alone(engine):
    """Each prompt run by itself: the reference for batching."""
    return [run(engine, [(p, GREEDY)])[0].outputs[0].token_ids for p in prompts()]


def test_continuous_batching_equals_alone_and_hugging_face(engine, alone, random_ckpt):
    batched = run(engine, [(p, GREEDY) for p in prompts()], per_step=2)  # 2 arrive before each step
    for prompt, out, solo in zip(prompts(), batched, alone):
        assert out.outputs[0].token_ids == solo
        reference, trusted = hf_greedy(random_ckpt[1], prompt, 16)
        assert out.outputs[0].token_ids[:trusted] == reference[:trusted]
        assert out.outputs[0].finish_reason == "length"


def test_chunked_prefill_mixes_decodes_and_a_prompt_chunk(random_ckpt, alone):
    engine = make_engine(random_ckpt[0], max_num_batched_tokens=8)
    try:
        plans: list[StepPlan] = []
        outs = run(engine, [(p, GREEDY) for p in prompts()], per_step=4, plans=plans)
    finally:
        engine.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert all(sum(p.num_scheduled_tokens) <= 8 for p in plans)
    mixed = [p for p in plans if 1 in p.num_scheduled_tokens and any(
        n > 1 and s == 0 for n, s in zip(p.num_scheduled_tokens, p.num_samples))]
    assert mixed, "no step held decode tokens and an unfinished prompt chunk together"


def test_preemption_when_the_cache_is_too_small(random_ckpt, alone):
    # 12 blocks of 16 tokens for 16 sequences of up to 40 tokens: they cannot all run at once.
    engine = make_engine(random_ckpt[0], kv_cache_memory=12 * 16 * 2 * 2 * 2 * 16 * 4, max_model_len=48)
    try:
        assert engine.block_manager.num_blocks == 12
        outs = run(engine, [(p, GREEDY) for p in prompts()])
        assert engine.scheduler.num_preemptions > 0
        # A resumed sequence finds its own full blocks in the prefix cache (the prompts share none).
        assert engine.block_manager.num_prefix_hits > 0
        assert [o.outputs[0].token_ids for o in outs] == alone
        # Seeded sampling is stateless: the same tokens after preemption as alone.
        seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)
        busy = run(engine, [(p, seeded) for p in prompts()])
        preemptions = engine.scheduler.num_preemptions
        solo = run(engine, [(prompts()[5], seeded)])
        assert busy[5].outputs[0].token_ids == solo[0].outputs[0].token_ids
        assert engine.scheduler.num_preemptions == preemptions  # alone, nothing was preempted
    finally:
        engine.shutdown()


def test_seeded_request_gives_the_same_tokens_alone_and_in_a_busy_batch(engine):
    seeded = SamplingParams(temperature=0.8, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    solo = run(engine, [(prompts()[3], seeded)])[0].outputs[0].token_ids
    others = [(p, SamplingParams(temperature=1.0, max_tokens=12)) for p in prompts(seed=1)[:10]]
    busy = run(engine, others[:5] + [(prompts()[3], seeded)] + others[5:], per_step=3)
    assert busy[5].outputs[0].token_ids == solo
    unseeded = run(engine, [(prompts()[3], SamplingParams(temperature=0.8, top_k=50, max_tokens=12))] * 2)
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids


def test_n_samples_share_the_prompt_blocks_and_copy_the_partial_one(engine):
    prompt = prompts()[0][:1] * 20  # 20 tokens: one full block of 16, then a partial one
    engine.add_request("fork", prompt, SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True))
    plans: list[StepPlan] = []
    execute = engine.executor.execute
    engine.executor.execute = lambda plan, bitmask=None: (plans.append(plan), execute(plan, bitmask))[1]
    try:
        deltas = engine.step()  # the prompt, and 3 samples drawn from its last row
        assert plans[-1].num_samples == [3]
        seqs = engine.requests["fork"].seqs
        bm = engine.block_manager
        assert len({tuple(s.block_table) for s in seqs}) == 1
        assert [bm.blocks[b].ref_count for b in seqs[0].block_table] == [3, 3]
        deltas += engine.step()  # each writes its first token: two copy the shared partial block
        assert len(plans[-1].block_copies) == 2
        assert len({s.block_table[0] for s in seqs}) == 1 and len({s.block_table[1] for s in seqs}) == 3
        while engine.has_unfinished_requests():
            deltas += engine.step()
    finally:
        engine.executor.execute = execute
    whole = RequestOutput.start(deltas[0])
    for delta in deltas[1:]:
        whole.add(delta)
    assert whole.finished
    samples = [c.token_ids for c in whole.outputs]
    assert len(samples) == 3 and len({tuple(s) for s in samples}) == 3
    assert bm.num_free_blocks == bm.num_blocks


def test_step_plan_of_a_decode_step_is_a_few_ints_per_sequence(engine):
    plans: list[StepPlan] = []
    run(engine, [(p, GREEDY) for p in prompts()], plans=plans)
    decode = [p for p in plans if not p.new_sequences and set(p.num_scheduled_tokens) == {1}]
    assert decode
    for plan in decode:
        b = len(plan.seq_ids)
        # 5 header ints (header length, has_bitmask, dropped, copies, sequences), then per
        # sequence: id, computed, scheduled, samples, 1 token, start, tail
        assert len(plan.encode()) <= 4 + 4 * (4 + 9 * b + len(plan.dropped_seq_ids))
        assert StepPlan.decode(plan.encode()) == plan


def test_prompt_logprobs_and_sampled_logprobs(engine, random_ckpt):
    prompt = prompts()[1]
    out = run(engine, [(prompt, SamplingParams(temperature=0.0, max_tokens=3, logprobs=2, prompt_logprobs=1,
                                               ignore_eos=True))])[0]
    with torch.no_grad():
        logprobs = torch.log_softmax(random_ckpt[1](torch.tensor([prompt + out.outputs[0].token_ids])).logits[0], -1)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry.token_id == prompt[pos]
        assert entry.logprob == pytest.approx(float(logprobs[pos - 1, prompt[pos]]), abs=1e-4)
    for i, entry in enumerate(out.outputs[0].logprobs):
        row = logprobs[len(prompt) - 1 + i]
        assert entry.logprob == pytest.approx(float(row[entry.token_id]), abs=1e-4)
        assert list(entry.top) == row.topk(2).indices.tolist()


def test_stop_conditions(engine):
    base = run(engine, [(prompts()[2], GREEDY)])[0].outputs[0]
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    by_id = run(engine, [(prompts()[2], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id]))])
    assert by_id[0].outputs[0].token_ids == base.token_ids[: first + 1]
    assert by_id[0].outputs[0].finish_reason == "stop" and by_id[0].outputs[0].stop_reason == stop_id
    later = run(engine, [(prompts()[2], SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id],
                                                       min_tokens=first + 2))])
    assert len(later[0].outputs[0].token_ids) > first + 1
    text = engine.tokenizer.decode(base.token_ids)
    assert base.text == text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        cut = run(engine, [(prompts()[2], SamplingParams(temperature=0, max_tokens=16, stop=[stop]))])[0].outputs[0]
        assert cut.text == text[: text.index(stop)] and cut.stop_reason == stop


def test_bad_requests_are_refused(engine):
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("e", [], GREEDY)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 300\)"):
        engine.add_request("e", [1, 300], GREEDY)
    with pytest.raises(ValueError, match="the prompt has 130 tokens, and max_model_len is 128"):
        engine.add_request("e", [1] * 130, GREEDY)
    with pytest.raises(ValueError, match="n=40 exceeds max_num_seqs=32"):
        engine.add_request("e", [1], SamplingParams(n=40))
    with pytest.raises(ValueError, match="300"):  # would otherwise fail inside the workers' sampler
        engine.add_request("e", [1], SamplingParams(logit_bias={300: 1.0}))
    assert not engine.has_unfinished_requests()


def test_a_cache_too_small_for_one_sequence_is_refused(random_ckpt):
    with pytest.raises(ValueError, match=r"holds 32 tokens \(2 blocks of 16\), less than one sequence of "
                                         r"max_model_len=128 tokens"):
        make_engine(random_ckpt[0], kv_cache_memory=2 * 16 * 2 * 2 * 2 * 16 * 4)
