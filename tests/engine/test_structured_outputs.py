"""Structured outputs on a random model, which never writes valid JSON by chance: every output
must parse and validate, greedy and sampled, n > 1, preempted, beside unconstrained requests;
a length-cut output is a prefix its grammar accepts; bad constraints are refused by name."""

from __future__ import annotations

import json
import re

import jsonschema_rs  # schemathesis brings it: a JSON Schema validator already in the lock
import llguidance
import numpy as np
import pytest
import torch
from test_llm_engine import make_engine, run

from tpserve.engine.grammar import grammar_text
from tpserve.engine.protocol import StepBitmask, StepPlan
from tpserve.engine.sampler import Sampler, SamplingBatch, apply_bitmask
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.structured_outputs import StructuredOutputsParams

# Strings and arrays are bounded: a random model never chooses to close them, so an unbounded
# one would run to max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                   "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                  "required": ["x", "y"], "additionalProperties": False},
        "items": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 4},
    },
    "required": ["ok", "point", "items"],
    "additionalProperties": False,
}
PROMPTS = [[5, 17, 99, 42], [250, 3, 3, 3, 3, 7], [120, 121, 122]]


def constrained(spec: StructuredOutputsParams, **kwargs) -> SamplingParams:
    return SamplingParams(structured_outputs=spec, **({"max_tokens": 200} | kwargs))


@pytest.fixture(scope="module")
def engine(random_ckpt):
    e = make_engine(random_ckpt[0], max_model_len=256)
    yield e
    e.shutdown()


@pytest.mark.parametrize("schema", [PERSON, NESTED], ids=["person", "nested"])
def test_json_schema_outputs_validate_greedy_and_sampled(engine, schema):
    spec = StructuredOutputsParams(json=schema)
    requests = [(p, constrained(spec, temperature=0.0)) for p in PROMPTS]
    requests += [(p, constrained(spec, temperature=1.0, seed=i, n=3)) for i, p in enumerate(PROMPTS)]
    for out in run(engine, requests):
        for o in out.outputs:
            assert o.finish_reason == "stop", o
            jsonschema_rs.validate(schema, json.loads(o.text))
            assert " " not in o.text.replace('" ', "").strip()[:2]  # no free whitespace at the start


def test_json_object_regex_and_choice(engine):
    choices = ["red", "green", "blue sky"]
    requests = [
        (PROMPTS[0], constrained(StructuredOutputsParams(json_object=True), temperature=0.0, max_tokens=240)),
        (PROMPTS[1], constrained(StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2,4}"), temperature=1.0, seed=3, n=2)),
        (PROMPTS[2], constrained(StructuredOutputsParams(choice=choices), temperature=1.0, seed=1, n=3)),
    ]
    obj, regex, choice = run(engine, requests)
    if obj.outputs[0].finish_reason == "stop":  # an unbounded object may run to max_tokens
        assert isinstance(json.loads(obj.outputs[0].text), dict)
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", o.text) and o.finish_reason == "stop" for o in regex.outputs)
    assert all(o.text in choices and o.finish_reason == "stop" for o in choice.outputs)


def test_constrained_beside_unconstrained_changes_nothing_unconstrained(engine):
    free = [(p, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)) for p in PROMPTS]
    alone = run(engine, free)
    spec = StructuredOutputsParams(json=PERSON)
    mixed = run(engine, free + [(p, constrained(spec, temperature=0.7, seed=9)) for p in PROMPTS])
    assert [o.outputs[0].token_ids for o in mixed[:3]] == [o.outputs[0].token_ids for o in alone]
    for out in mixed[3:]:
        jsonschema_rs.validate(PERSON, json.loads(out.outputs[0].text))


def test_preempted_constrained_requests_stay_valid_and_unchanged(random_ckpt, engine):
    spec = StructuredOutputsParams(json=NESTED)
    requests = [(p, constrained(spec, temperature=0.0, max_tokens=100)) for p in PROMPTS * 2]
    alone = [run(engine, [r])[0].outputs[0].token_ids for r in requests]
    # 10 blocks of 16 tokens (512 bytes a token) for 6 sequences of ~4 blocks: some are preempted.
    tight = make_engine(random_ckpt[0], kv_cache_memory=10 * 16 * 512, max_model_len=128)
    try:
        assert tight.block_manager.num_blocks == 10
        together = run(tight, requests)
        assert tight.scheduler.num_preemptions > 0
    finally:
        tight.shutdown()
    assert [o.outputs[0].token_ids for o in together] == alone
    for out in together:
        jsonschema_rs.validate(NESTED, json.loads(out.outputs[0].text))


def test_length_cut_output_is_a_prefix_its_grammar_accepts(engine):
    spec = StructuredOutputsParams(json=PERSON)
    (out,) = run(engine, [(PROMPTS[0], constrained(spec, temperature=1.0, seed=5, max_tokens=7))])
    o = out.outputs[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 7
    matcher = llguidance.LLMatcher(engine.grammars.tokenizer, grammar_text(spec))
    assert matcher.consume_tokens(o.token_ids) and not matcher.is_stopped()
    assert o.text.startswith('{"')


def test_step_plan_and_bitmask_bytes_of_a_constrained_decode_step(engine):
    plans: list[StepPlan] = []
    masks: list[StepBitmask] = []
    execute = engine.executor.execute

    def spy(plan, bitmask=None):
        plans.append(plan)
        return execute(plan, bitmask and (lambda: masks.append(bitmask()) or masks[-1]))

    engine.executor.execute = spy
    try:
        spec = StructuredOutputsParams(json=PERSON)
        run(engine, [(p, constrained(spec, temperature=0.0)) for p in PROMPTS]
            + [(p, SamplingParams(temperature=0.0, max_tokens=8)) for p in PROMPTS])
    finally:
        engine.executor.execute = execute
    words = (engine.vocab_size + 31) // 32
    for plan in plans:
        if plan.has_bitmask and not plan.new_sequences and set(plan.num_scheduled_tokens) == {1}:
            mask = masks.pop(0)
            k, b = len(mask.seq_ids), len(plan.seq_ids)
            assert 1 <= k <= b and set(mask.seq_ids) <= set(plan.seq_ids)
            # the plan's bound, plus the side message: its 2-int header, k ids and k masks
            assert len(plan.encode()) <= 4 + 4 * (4 + 9 * b + len(plan.dropped_seq_ids))
            assert len(mask.encode()) == 4 * (2 + k + k * words)
            back = StepBitmask.decode(mask.encode())
            assert back.seq_ids == mask.seq_ids and np.array_equal(back.words, mask.words)
        elif plan.has_bitmask:
            masks.pop(0)


@pytest.mark.parametrize("spec, message", [
    (dict(json={"type": "nope"}), "json cannot be compiled: Invalid type"),
    (dict(json={"$ref": "#/missing"}), "json cannot be compiled"),
    (dict(regex="(ab"), "regex cannot be compiled"),
    (dict(grammar="start: undefined_rule"), "grammar cannot be compiled"),
])
def test_bad_constraints_are_refused_by_name(engine, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.add_request("bad", PROMPTS[0], constrained(StructuredOutputsParams(**spec)))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("spec, message", [
    (dict(), "exactly one of"),
    (dict(regex="a", choice=["a"]), "exactly one of"),
    (dict(json="{not json"), "not valid JSON"),
    (dict(choice=[]), "non-empty list"),
])
def test_malformed_constraints_fail_on_construction(spec, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**spec)
    with pytest.raises(ValueError, match="unknown fields"):
        SamplingParams(structured_outputs={"json": {}, "backend": "xgrammar"})


def test_mask_comes_first_and_disallowed_logprobs_are_minus_inf():
    V = 70
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=g)
    allowed = [5, 40, 64, 69]
    words = np.zeros((1, 3), dtype=np.int32)
    for t in allowed:
        words[0, t // 32] |= np.array(1 << (t % 32), dtype=np.uint32).view(np.int32)
    masked = apply_bitmask(logits, torch.tensor([1]), torch.from_numpy(words))
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])
    assert torch.isfinite(masked[1]).nonzero()[:, 0].tolist() == allowed
    # A bias of +100 on a disallowed token cannot lift it; min_tokens does not ban eos on a masked row.
    params = SamplingParams(temperature=0.0, logit_bias={6: 100.0}, logprobs=2, min_tokens=5)
    rows = [(params, [], [], 1, 0, 0, None), (params, [], [], 1, 0, 0, words[0]), (params, [], [], 1, 0, 0, None)]
    out = Sampler()(logits, SamplingBatch.build(rows, V, eos_token_ids=[69], device="cpu"))
    assert out.token_ids.tolist()[0] == 6 and out.token_ids.tolist()[1] in allowed
    assert out.top_logprob_ids[1].tolist()[0] in allowed and out.top_logprobs[1, 0] > -float("inf")
    sampled = SamplingBatch.build([(SamplingParams(temperature=1.0), [], [], s, 0, 0, words[0]) for s in range(20)],
                                  V, eos_token_ids=[], device="cpu")
    assert set(Sampler()(logits[[1] * 20], sampled).token_ids.tolist()) <= set(allowed)


@pytest.mark.slow
def test_the_mask_reaches_a_driver_on_another_stage(random_ckpt):
    """At PP 2 the sampling rank is the second stage's: the bitmask goes from the engine to rank 0
    with the plan and from there over torch.distributed, and the outputs must still validate."""
    e = make_engine(random_ckpt[0], max_model_len=256, pipeline_parallel_size=2)
    try:
        spec = StructuredOutputsParams(json=PERSON)
        requests = [(p, constrained(spec, temperature=0.0)) for p in PROMPTS]
        requests += [(PROMPTS[0], constrained(spec, temperature=1.0, seed=7, n=2))]
        for out in run(e, requests):
            for o in out.outputs:
                assert o.finish_reason == "stop", o
                jsonschema_rs.validate(PERSON, json.loads(o.text))
    finally:
        e.shutdown()
