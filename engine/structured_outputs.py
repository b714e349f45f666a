"""`StructuredOutputsParams`: the one constraint a request's output must follow, in vLLM's names.

Exactly one of `json` (a JSON Schema, as a dict or its text), `json_object` (any JSON object),
`regex`, `choice` (one of these strings, verbatim) or `grammar` (a Lark grammar in llguidance's
dialect; a GBNF grammar, recognised by its `::=`, is converted). The engine compiles it into a
token matcher (engine/grammar.py); this module only checks the shape and names the grammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass
class StructuredOutputsParams:
    json: dict[str, Any] | str | None = None  # a JSON Schema
    json_object: bool = False  # any JSON object ({"type": "object"})
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError(
                "structured outputs take exactly one of json, json_object, regex, choice or grammar; "
                f"got {', '.join(given) if given else 'none'}"
            )
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured outputs json: the schema is not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"structured outputs json: a schema is a JSON object, not {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured outputs {name} must be a non-empty string")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice:
                raise ValueError("structured outputs choice must be a non-empty list of strings")
            for i, c in enumerate(self.choice):
                if not isinstance(c, str) or not c:
                    raise ValueError(f"structured outputs choice[{i}]={c!r} must be a non-empty string")

    def key(self) -> str:
        """A text that names this constraint exactly: the key of the compiled-grammar cache."""
        return json.dumps(
            [self.json, self.json_object, self.regex, self.choice, self.grammar], sort_keys=True, separators=(",", ":")
        )
