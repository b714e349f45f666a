"""Tool calling through the unmodified openai SDK on the tiny random model, which never writes a
tool call by chance: "required" and a named function must still give calls whose arguments
validate (the call is forced), streamed deltas must reassemble to the non-streamed call, "auto"
and "none" must not invent calls, and bad requests get 400s naming the problem. The SmolLM2
tests (tests/server/test_smollm2.py) check the same on a real model with its shipped template."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema_rs
import openai
import pytest
from helpers import random_checkpoint

import tpserve.server

TEMPLATE = Path(tpserve.server.__file__).with_name("tool_chat_template_hermes.jinja")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -99, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_server(start_server, tmp_path_factory):
    # The tool template's system prompt is ~900 of the tiny tokenizer's tokens: a longer model.
    checkpoint, _ = random_checkpoint(tmp_path_factory.mktemp("tools_ckpt"), max_position_embeddings=2048)
    return start_server("--chat-template", str(TEMPLATE), "--max-model-len", "1536", "--kv-cache-memory", "64MB",
                        checkpoint=checkpoint)


@pytest.fixture(scope="module")
def client(tool_server):
    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def check_calls(choice, names=None):
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    for call in calls:
        assert names is None or call.function.name in names
        jsonschema_rs.validate(SCHEMAS[call.function.name], json.loads(call.function.arguments))
    return calls


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_gives_calls_whose_arguments_validate(client, temperature):
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           temperature=temperature, seed=seed, max_tokens=100, n=2)
        for choice in r.choices:
            check_calls(choice)


def test_a_named_function_is_the_one_called(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=100,
                                       tool_choice={"type": "function", "function": {"name": "add"}}, temperature=1.0)
    (call,) = check_calls(r.choices[0], {"add"})
    assert set(json.loads(call.function.arguments)) == {"a", "b"}


def test_streamed_deltas_reassemble_to_the_call(client):
    kwargs = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=0.0, max_tokens=100)
    (whole,) = check_calls(client.chat.completions.create(**kwargs).choices[0])
    calls, finish = {}, None
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"name": "", "arguments": ""})
                if d.id:
                    assert d.type == "function" and d.function.name and call["name"] == ""
                    call["name"] = d.function.name
                call["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert list(calls.values()) == [{"name": whole.function.name, "arguments": whole.function.arguments}]


def test_auto_and_none_never_invent_a_call(client):
    """The random model writes no tool call, so "auto" must return its text as content; "none"
    does not even show it the tools."""
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                           temperature=0.0, max_tokens=20)
        assert r.choices[0].message.tool_calls is None and r.choices[0].message.content, choice
        assert r.choices[0].finish_reason in ("stop", "length")


def test_a_tool_result_goes_back_to_the_model(client, tool_server):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, temperature=0.0, max_tokens=8)
    assert r.choices[0].message.content is not None
    # The prompt holds the call and its result as the template writes them.
    with_result = r.usage.prompt_tokens
    r = client.chat.completions.create(model="tiny", messages=messages[:1], tools=TOOLS, temperature=0.0, max_tokens=8)
    assert with_result > r.usage.prompt_tokens + 10


@pytest.mark.parametrize("body, message", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "sub"}}},
     "tool_choice names function 'sub', which is not in tools (get_weather, add)"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name: this field is required"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type: Input should be 'function'"),
    ({"tools": [WEATHER, WEATHER]}, "function names must be unique"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "cannot be combined with response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "(unclosed"}}}}}], "tool_choice": "required"}, "tools: "),
])
def test_bad_tool_requests_are_400s(tool_server, body, message):
    r = httpx.post(tool_server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": MESSAGES, "max_tokens": 4, **body})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_a_template_without_tools_and_no_override_is_a_400(server):
    """The tiny checkpoint's own ChatML template does not render tools."""
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 4})
    assert r.status_code == 400 and "--chat-template FILE" in r.json()["error"]["message"], r.text
