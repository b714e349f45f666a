"""Structured outputs over HTTP on the tiny random model, which never writes valid JSON by chance:
OpenAI's response_format through the unmodified openai SDK (chat and completions, streamed and
not, n = 3), vLLM's structured_outputs (regex, choice, grammar) and /generate; bad constraints
answer 400 naming the problem."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema_rs  # schemathesis brings it: a JSON Schema validator already in the lock
import openai
import pytest

MESSAGES = [{"role": "user", "content": "Give me a point."}]
# Bounded strings and arrays: a random model never closes an unbounded one by itself.
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "pattern": "^[a-z]{1,5}$"},
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                   "y": {"type": "integer", "minimum": 0, "maximum": 99}},
                  "required": ["x", "y"], "additionalProperties": False},
        "kind": {"enum": ["a", "b", "c"]},
        "ids": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "maxItems": 3},
    },
    "required": ["label", "point", "kind"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "point", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def valid(text: str) -> None:
    jsonschema_rs.validate(SCHEMA, json.loads(text))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chat_json_schema_through_the_sdk(client, temperature):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=90, temperature=temperature,
                                         seed=1, n=3, response_format=RESPONSE_FORMAT)
    assert len(out.choices) == 3
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        valid(choice.message.content)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=90, seed=2, n=3,
                                                 temperature=temperature, stream=True, response_format=RESPONSE_FORMAT))
    texts, reasons = {}, {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    assert sorted(texts) == [0, 1, 2] and set(reasons.values()) == {"stop"}
    for text in texts.values():
        valid(text)


def test_completions_json_schema_and_a_length_cut_prefix(client):
    out = client.completions.create(model="tiny", prompt="point:", max_tokens=90, temperature=0.8, seed=4, n=2,
                                    extra_body={"response_format": RESPONSE_FORMAT})
    for choice in out.choices:
        valid(choice.text)
    cut = client.completions.create(model="tiny", prompt="point:", max_tokens=4, temperature=0.8, seed=4,
                                    extra_body={"response_format": RESPONSE_FORMAT})
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].text.startswith('{"')  # the schema's first key, no free whitespace


def test_regex_choice_and_grammar_as_vllm_extra_fields(client):
    regex = client.completions.create(model="tiny", prompt="code:", max_tokens=20, temperature=1.0, seed=3, n=3,
                                      extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-[0-9]{2,3}"}})
    assert all(re.fullmatch(r"[A-Z]{2}-[0-9]{2,3}", c.text) for c in regex.choices)
    choices = ["yes", "no", "maybe not"]
    choice = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=5,
                                            n=3, extra_body={"structured_outputs": {"choice": choices}})
    assert all(c.message.content in choices and c.finish_reason == "stop" for c in choice.choices)
    grammar = 'start: "(" num ("," num)* ")"\nnum: /[0-9]/'
    out = client.completions.create(model="tiny", prompt="tuple:", max_tokens=30, temperature=0.0,
                                    extra_body={"structured_outputs": {"grammar": grammar}})
    if out.choices[0].finish_reason == "stop":
        assert re.fullmatch(r"\([0-9](,[0-9])*\)", out.choices[0].text)
    else:  # the model may keep adding numbers up to max_tokens: then a prefix
        assert re.fullmatch(r"\([0-9](,[0-9]?)*", out.choices[0].text)


def test_generate_takes_the_same_fields(server):
    body = {"prompt": "pick:", "max_tokens": 10, "temperature": 1.0, "seed": 1, "n": 2,
            "structured_outputs": {"choice": ["left", "right"]}}
    out = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    assert all(o["text"] in ("left", "right") and o["finish_reason"] == "stop" for o in out["outputs"])
    streamed = httpx.post(server.url + "/generate", json=body | {"stream": True, "max_tokens": 90,
                                                                 "structured_outputs": None,
                                                                 "response_format": RESPONSE_FORMAT}, timeout=60)
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: ")]
    texts = {}
    for e in events[:-1]:
        texts[e["index"]] = texts.get(e["index"], "") + e["text"]
    assert len(texts) == 2 and events[-1]["finished"]
    for text in texts.values():
        valid(text)


@pytest.mark.parametrize("body, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "json cannot be compiled: Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 'needs json_schema: {"name"'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
     "json cannot be compiled"),
    ({"structured_outputs": {"regex": "(ab"}}, "regex cannot be compiled"),
    ({"structured_outputs": {"grammar": "start: missing"}}, "grammar cannot be compiled"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one of"),
    ({"structured_outputs": {"choice": []}}, "non-empty list"),
    ({"structured_outputs": {"backend": "xgrammar"}}, "unrecognized request argument"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "not both"),
])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/generate"])
def test_bad_constraints_answer_400_naming_the_problem(server, route, body, message):
    request = {"prompt": "hi"} if route != "/v1/chat/completions" else {"messages": MESSAGES}
    answer = httpx.post(server.url + route, json=request | body | {"max_tokens": 4}, timeout=60)
    assert answer.status_code == 400, answer.text
    assert message in answer.json()["error"]["message"]
