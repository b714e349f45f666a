"""The real default model: `tpserve serve` with no --checkpoint (what `make serve` runs) converts
SmolLM2-135M-Instruct on first start, and its chat template and tokenizer give, through the
openai SDK, the LLM API's greedy text."""

from __future__ import annotations

import openai
import pytest
from helpers import ENGINE_PINS

from tpserve import SamplingParams

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg_cache")


@pytest.fixture(scope="module")
def smollm2_server(start_server, cache):
    # A fresh cache: the server converts the default model itself, as on a user's first `make serve`.
    return start_server("--max-model-len", "512", "--kv-cache-memory", "64MB", "--served-model-name",
                        "smollm2", checkpoint=None, env={"XDG_CACHE_HOME": str(cache)})


def test_default_model_chat_and_completions_equal_the_llm_api(smollm2_server, cache):
    from tpserve import LLM
    from tpserve.model.checkpoint import prepare_default_model

    client = openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    chat = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=24, temperature=0)
    completion_chunks = list(client.completions.create(model="smollm2", prompt="The capital of France is",
                                                       max_tokens=16, temperature=0, stream=True))
    with LLM(prepare_default_model(cache / "tpserve"), max_model_len=512, kv_cache_memory=64 << 20,
             **ENGINE_PINS) as llm:
        tokenizer = llm.get_tokenizer()
        text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        want_chat = llm.generate(ids, SamplingParams(temperature=0, max_tokens=24))[0]
        want_completion = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=16))[0]
    assert chat.choices[0].message.content == want_chat.outputs[0].text
    assert "Paris" in chat.choices[0].message.content
    assert chat.usage.prompt_tokens == len(ids)
    streamed = "".join(c.choices[0].text for c in completion_chunks)
    assert streamed == want_completion.outputs[0].text


# Nested objects, arrays, enums, required fields, string patterns and number ranges.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]+ [A-Z][a-z]+$"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "skills"],
    "additionalProperties": False,
}
PERSON_MESSAGES = [{"role": "user", "content": "Describe a fictional employee as JSON."}]


def test_default_model_json_schema_outputs_validate(smollm2_server):
    import asyncio
    import json

    import jsonschema_rs

    client = openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    texts = []
    for temperature in (0.0, 0.8):
        out = client.chat.completions.create(model="smollm2", messages=PERSON_MESSAGES, max_tokens=160, n=3,
                                             temperature=temperature, seed=3, response_format=fmt)
        texts += [c.message.content for c in out.choices]
        chunks = list(client.chat.completions.create(model="smollm2", messages=PERSON_MESSAGES, max_tokens=160,
                                                     temperature=temperature, seed=4, response_format=fmt,
                                                     stream=True))
        texts.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    for text in texts:
        jsonschema_rs.validate(PERSON_SCHEMA, json.loads(text))

    # Among unconstrained requests, which must come out as they do alone.
    prompts = [f"Count from {i} to {i + 5}:" for i in range(8)]

    async def run() -> tuple[list[str], list]:
        aclient = openai.AsyncOpenAI(base_url=smollm2_server.url + "/v1", api_key="none", max_retries=0,
                                     timeout=300)

        async def free(prompt):
            out = await aclient.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0)
            return out.choices[0].text

        alone = [await free(p) for p in prompts]
        constrained = aclient.chat.completions.create(model="smollm2", messages=PERSON_MESSAGES, max_tokens=160,
                                                      temperature=0.8, seed=5, n=3, response_format=fmt)
        mixed = await asyncio.gather(constrained, *[free(p) for p in prompts])
        await aclient.close()
        return alone, mixed

    alone, mixed = asyncio.run(run())
    assert mixed[1:] == alone
    for choice in mixed[0].choices:
        jsonschema_rs.validate(PERSON_SCHEMA, json.loads(choice.message.content))


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the web",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "maxLength": 40},
            "sites": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
            "required": ["query"], "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_default_model_calls_tools_with_valid_arguments(smollm2_server):
    """`tpserve serve` with no flags: the default model takes tools through tpserve's ChatML tool
    template, and "required" or a named function gives calls whose arguments validate."""
    import json

    import jsonschema_rs

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    client = openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    cases = [dict(tool_choice="required", temperature=0.0), dict(tool_choice="required", temperature=0.8, seed=3, n=2),
             dict(tool_choice={"type": "function", "function": {"name": "search"}}, temperature=0.0)]
    for kwargs in cases:
        r = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, max_tokens=120, **kwargs)
        for choice in r.choices:
            assert choice.finish_reason == "tool_calls", (kwargs, choice)
            for call in choice.message.tool_calls:
                jsonschema_rs.validate(schemas[call.function.name], json.loads(call.function.arguments))
                if not isinstance(kwargs["tool_choice"], str):
                    assert call.function.name == "search"

    whole = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0.0, max_tokens=120).choices[0].message.tool_calls
    streamed = {}
    for chunk in client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required",
                                                temperature=0.0, max_tokens=120, stream=True):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = streamed.setdefault(d.index, {"name": "", "arguments": ""})
            call["name"] += (d.function.name or "") if d.id else ""
            call["arguments"] += d.function.arguments or ""
    assert list(streamed.values()) == [{"name": c.function.name, "arguments": c.function.arguments} for c in whole]

    # The call goes back with its result, and the model answers in text.
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in whole]},
                      {"role": "tool", "tool_call_id": whole[0].id, "content": "18 degrees Celsius and sunny"}]
    answer = client.chat.completions.create(model="smollm2", messages=messages, tools=TOOLS, temperature=0.0,
                                            max_tokens=40)
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")


def test_default_model_auto_and_none_are_its_own_text(smollm2_server, cache):
    """"auto" parses what the model wrote: SmolLM2-135M, asked for the weather, answers in prose
    (it does not choose to call), so the message is exactly the `LLM` API's greedy text for the
    same prompt with the tools. "none" is its answer without them."""
    from tpserve import LLM
    from tpserve.model.checkpoint import prepare_default_model
    from tpserve.server.chat_api import HERMES_TOOL_TEMPLATE

    client = openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="none", max_retries=0, timeout=300)
    auto = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="auto",
                                          temperature=0.0, max_tokens=32).choices[0]
    none = client.chat.completions.create(model="smollm2", messages=ASK, tools=TOOLS, tool_choice="none",
                                          temperature=0.0, max_tokens=32).choices[0]
    with LLM(prepare_default_model(cache / "tpserve"), max_model_len=512, kv_cache_memory=64 << 20,
             **ENGINE_PINS) as llm:
        tokenizer = llm.get_tokenizer()
        params = SamplingParams(temperature=0.0, max_tokens=32)
        with_tools = tokenizer.apply_chat_template(ASK, tools=TOOLS, chat_template=HERMES_TOOL_TEMPLATE.read_text(),
                                                   tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True)
        expected_auto, expected_none = (llm.generate(tokenizer(t, add_special_tokens=False)["input_ids"], params)[0]
                                        for t in (with_tools, without))
    assert auto.message.tool_calls is None and auto.message.content == expected_auto.outputs[0].text
    assert none.message.tool_calls is None and none.message.content == expected_none.outputs[0].text
