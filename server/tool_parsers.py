"""Tool calls in a model's text: how to read them, stream them and force them, one parser per format.

A parser knows one format, under vLLM's `--tool-call-parser` name:

- `hermes`: each call is `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, after any
  text (Hermes, Qwen 2.5, and the ChatML tool template tpserve ships for the default model).
- `llama3_json`: the whole output is one call, `{"name": ..., "parameters": {...}}`, or several
  separated by `;` (Llama 3.1's JSON tool calling).

For `tool_choice` "required" or a named function, `grammar()` gives the Lark grammar (llguidance's
dialect, with the functions' parameter schemas as `%json` rules) that structured outputs enforce,
so a forced call always parses and its arguments always validate. Under "auto" the model chooses,
and what it wrote is parsed: a block that does not parse leaves the whole output as content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

# Compact JSON (no free whitespace) inside forced calls: a small model left to choose could spend
# its tokens on spaces.
_JSON_OPTIONS = {"whitespace_flexible": False}


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it
    id: str = field(default_factory=call_id)

    def message(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call_schema(tool: dict, arguments_key: str) -> dict:
    parameters = tool["function"].get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": tool["function"]["name"]}, arguments_key: parameters},
            "required": ["name", arguments_key], "additionalProperties": False}


def _as_call(obj: Any, arguments_key: str, names: set[str]) -> ToolCall | None:
    if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and obj["name"] in names):
        return None
    arguments = obj.get(arguments_key, {})
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class HermesToolParser:
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"
    ARGUMENTS = "arguments"

    def grammar(self, tools: list[dict]) -> str:
        """One call to one of `tools`, in this format."""
        schema = {"anyOf": [_call_schema(t, self.ARGUMENTS) for t in tools], "x-guidance": _JSON_OPTIONS}
        return f'start: "{self.START}\\n" call "\\n{self.END}"\ncall: %json {json.dumps(schema)}'

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
        """(content, calls): the text before the first call, and every complete call. An
        unfinished last call (cut by max_tokens) is dropped; a call that does not parse, or names
        no given function, makes the whole text content."""
        start = text.find(self.START)
        if start < 0:
            return text, []
        calls = []
        rest = text[start:]
        while (begin := rest.find(self.START)) >= 0:
            end = rest.find(self.END, begin)
            if end < 0:
                break
            try:
                call = _as_call(json.loads(rest[begin + len(self.START) : end]), self.ARGUMENTS, names)
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
            rest = rest[end + len(self.END) :]
        content = text[:start].rstrip()
        return content or None, calls

    def streamer(self, names: set[str]) -> "ToolCallStreamer":
        return ToolCallStreamer(self, names, self.START)


class Llama3JsonToolParser:
    name = "llama3_json"
    ARGUMENTS = "parameters"

    def grammar(self, tools: list[dict]) -> str:
        schema = {"anyOf": [_call_schema(t, self.ARGUMENTS) for t in tools], "x-guidance": _JSON_OPTIONS}
        return f"start: %json {json.dumps(schema)}"

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
        """Calls only when the whole output is calls (JSON objects, `;` between them)."""
        decoder, calls, pos = json.JSONDecoder(), [], 0
        body = text.strip()
        if not body.startswith("{"):
            return text, []
        while pos < len(body):
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text, []
            call = _as_call(obj, self.ARGUMENTS, names)
            if call is None:
                return text, []
            calls.append(call)
            while pos < len(body) and body[pos] in "; \n\t":
                pos += 1
        return None, calls

    def streamer(self, names: set[str]) -> "ToolCallStreamer":
        return ToolCallStreamer(self, names, None)


class ToolCallStreamer:
    """Tool calls as OpenAI streams them, and the same as the parse of the whole text gives.

    Content before the first call streams as it comes (`start`, the call marker, given), holding
    back a tail that could be whitespace before a call or the marker's beginning; a format whose
    calls are the whole output (`start` None) streams nothing until the end. The calls go out at
    the end, once the whole text is parsed (a block that does not parse makes it all content):
    for each, a delta with its id, type and name, then one with its arguments."""

    def __init__(self, parser, names: set[str], start: str | None) -> None:
        self.parser, self.names, self.start = parser, names, start
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.held = ""  # whitespace cut before the first call, sent only if no call parses
        self.calls: list[ToolCall] = []

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        """(content delta, tool-call deltas) for the next piece of text; `final` ends it."""
        self.text += delta
        content = ""
        first = self.text.find(self.start) if self.start else -1
        if self.start and (first < 0 or self.sent < first):
            end = first if first >= 0 else len(self.text) - (0 if final else _held_back(self.text, self.start))
            piece = self.text[self.sent : end]
            if first >= 0:
                kept = piece.rstrip()
                piece, self.held = kept, piece[len(kept) :]
            content, self.sent = piece, end
        if not final:
            return content, []
        whole, self.calls = self.parser.parse(self.text, self.names)
        if not self.calls:
            return content + self.held + self.text[self.sent :], []
        deltas = []
        for index, call in enumerate(self.calls):
            deltas.append({"index": index, "id": call.id, "type": "function",
                           "function": {"name": call.name, "arguments": ""}})
            deltas.append({"index": index, "function": {"arguments": call.arguments}})
        return content, deltas


def _held_back(text: str, marker: str) -> int:
    """How many characters at the end of `text` could come before `marker` (whitespace) or be its
    beginning."""
    tail = 0
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            tail = n
            break
    body = text[: len(text) - tail]
    return tail + len(body) - len(body.rstrip())


TOOL_PARSERS = {p.name: p for p in (HermesToolParser(), Llama3JsonToolParser())}
