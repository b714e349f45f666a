"""Tool-call parsers (server/tool_parsers.py), without a model: what the parse of a whole text gives,
and that streaming the same text in pieces, cut anywhere, reassembles to exactly that: the content,
and each call's name and arguments (a delta with id, type and name, then its arguments)."""

from __future__ import annotations

import json

import llguidance
import pytest

from tpserve.server.tool_parsers import TOOL_PARSERS

NAMES = {"get_weather", "add"}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
CALL2 = '<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>'

HERMES = [
    # text, expected content, expected [(name, arguments object)]
    ("Just an answer.", "Just an answer.", []),
    (CALL, None, [("get_weather", {"city": "Paris", "days": 2})]),
    ("Let me look.\n\n" + CALL + "\n" + CALL2, "Let me look.", [("get_weather", {"city": "Paris", "days": 2}),
                                                                ("add", {"a": 1, "b": 2})]),
    ("a < b but <tool_ is no call", "a < b but <tool_ is no call", []),
    # not JSON, or a function not given: the whole text is content
    ("x <tool_call>\n{not json}\n</tool_call>", "x <tool_call>\n{not json}\n</tool_call>", []),
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),
    # cut by max_tokens inside the second call: the first stands
    ("ok " + CALL + '\n<tool_call>\n{"name": "add", "argu', "ok", [("get_weather", {"city": "Paris", "days": 2})]),
]
LLAMA3 = [
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}', None, [("add", {"a": 1, "b": 2})]),
    ('{"name": "add", "parameters": {"a": 1}}; {"name": "get_weather", "parameters": {"city": "Rome"}}', None,
     [("add", {"a": 1}), ("get_weather", {"city": "Rome"})]),
    ("The answer is 3.", "The answer is 3.", []),
    ('{"name": "add", "parameters": {"a": 1}} and more', '{"name": "add", "parameters": {"a": 1}} and more', []),
]


def reassemble(parser, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, dict]], list[dict]]:
    streamer = parser.streamer(NAMES)
    content, deltas = "", []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    for i, piece in enumerate(pieces):
        c, d = streamer.feed(piece, final=i == len(pieces) - 1)
        content += c
        deltas += d
    calls = {}
    for d in deltas:
        call = calls.setdefault(d["index"], {"name": None, "arguments": ""})
        if "id" in d:
            assert d["type"] == "function" and d["id"].startswith("call_") and d["function"]["arguments"] == ""
            call["name"] = d["function"]["name"]
        call["arguments"] += d["function"]["arguments"]
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], deltas


@pytest.mark.parametrize("name, cases", [("hermes", HERMES), ("llama3_json", LLAMA3)])
def test_parse_and_every_way_of_streaming_agree(name, cases):
    parser = TOOL_PARSERS[name]
    for text, content, calls in cases:
        parsed_content, parsed = parser.parse(text, NAMES)
        assert parsed_content == content, text
        assert [(c.name, json.loads(c.arguments)) for c in parsed] == calls, text
        for cut in range(len(text) + 1):  # one cut anywhere, and token-sized pieces
            for cuts in ([cut], list(range(cut % 3 + 1, len(text), 3))):
                streamed, streamed_calls, _ = reassemble(parser, text, cuts)
                assert streamed == (content or ""), (text, cuts)
                assert streamed_calls == calls, (text, cuts)


def test_hermes_streams_content_before_the_call_as_it_comes():
    streamer = TOOL_PARSERS["hermes"].streamer(NAMES)
    assert streamer.feed("Let me ") == ("Let me", [])  # a trailing space might precede a call
    assert streamer.feed("look. <tool") == (" look.", [])  # " <tool" might begin a call: held back
    assert streamer.feed("_call>\n") == ("", [])
    content, deltas = streamer.feed(CALL.removeprefix("<tool_call>\n"), final=True)
    assert content == "" and [d["function"].get("name") for d in deltas] == ["get_weather", None]


@pytest.mark.parametrize("name", ["hermes", "llama3_json"])
def test_forcing_grammar_accepts_a_valid_call_and_refuses_others(name):
    """The grammar of "required": one call of a given function with schema-valid arguments."""
    parser = TOOL_PARSERS[name]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}},
             {"type": "function", "function": {"name": "get_weather"}}]
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()))
    key = "arguments" if name == "hermes" else "parameters"
    wrap = (lambda body: f"<tool_call>\n{body}\n</tool_call>") if name == "hermes" else (lambda body: body)

    def accepts(body: str) -> bool:
        matcher = llguidance.LLMatcher(tokenizer, parser.grammar(tools), log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher.consume_tokens(list(wrap(body).encode())) and matcher.is_accepting()

    assert accepts(json.dumps({"name": "add", key: {"a": 1, "b": 2}}, separators=(",", ":")))
    assert accepts(json.dumps({"name": "get_weather", key: {"anything": [1]}}, separators=(",", ":")))
    assert not accepts(json.dumps({"name": "add", key: {"a": 1}}, separators=(",", ":")))  # b is required
    assert not accepts(json.dumps({"name": "add", key: {"a": "1", "b": 2}}, separators=(",", ":")))
    assert not accepts(json.dumps({"name": "sub", key: {}}, separators=(",", ":")))


class _ByteTokenizer:
    """A vocabulary of the 256 bytes and an end token: enough for llguidance to check text."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([b]) for b in range(256)] + [b"<eos>"]
    special_token_ids = [256]

    def __call__(self, text):
        return list(text.encode() if isinstance(text, str) else text)
