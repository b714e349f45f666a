"""`SamplingParams`: how one request wants its tokens drawn, in vLLM's names and meanings.

Every field is checked on construction; a bad value raises ValueError naming the value and
the allowed range (the server turns it into HTTP 400). The step plan sends these as JSON and
rebuilds them on the workers, so construction also accepts what JSON gives back (string keys
in `logit_bias`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from tpserve.engine.structured_outputs import StructuredOutputsParams

# OpenAI's cap on top logprobs per position; vLLM's default max_logprobs is the same.
MAX_LOGPROBS = 20
# OpenAI's range for logit_bias values: -100 bans a token in practice, 100 forces it.
MAX_LOGIT_BIAS = 100.0


@dataclass
class SamplingParams:
    n: int = 1  # samples per prompt; they share the prompt's KV blocks
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose mass reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off (stored as 0)
    min_p: float = 0.0  # drop tokens less likely than min_p * the top token's probability
    repetition_penalty: float = 1.0  # Hugging Face/CTRL style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI style, over output tokens only
    frequency_penalty: float = 0.0  # OpenAI style, over output tokens only
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    seed: int | None = None  # None: the engine draws one; the same seed gives the same tokens
    max_tokens: int | None = 16  # None: up to the model's length
    min_tokens: int = 0  # eos and stop_token_ids are banned until this many tokens exist
    stop: str | list[str] | None = None  # stored as a list
    stop_token_ids: list[int] | None = None  # stored as a list
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-n logprobs per sampled token; 0 = the sampled token's only
    prompt_logprobs: int | None = None  # the same for every prompt token
    skip_special_tokens: bool = True
    # The output must follow this JSON schema, regex, choice or grammar (engine/grammar.py).
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        _int(self, "n", low=1)
        _number(self, "temperature", low=0.0)
        _number(self, "top_p", low=0.0, high=1.0, open_low=True)
        _int(self, "top_k")
        _check(self.top_k >= -1, f"top_k={self.top_k} must be >= 1, or 0 or -1 for off")
        self.top_k = max(self.top_k, 0)
        _number(self, "min_p", low=0.0, high=1.0)
        _number(self, "repetition_penalty", low=0.0, open_low=True)
        _number(self, "presence_penalty", low=-2.0, high=2.0)
        _number(self, "frequency_penalty", low=-2.0, high=2.0)
        if self.logit_bias is not None:
            self.logit_bias = _logit_bias(self.logit_bias)
        if self.seed is not None:
            _int(self, "seed")
        if self.max_tokens is not None:
            _int(self, "max_tokens", low=1)
        _int(self, "min_tokens", low=0)
        if self.max_tokens is not None:
            _check(
                self.min_tokens <= self.max_tokens,
                f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}",
            )
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _stop_token_ids(self.stop_token_ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), f"{name}={getattr(self, name)!r} must be True or False")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _int(self, name, low=0, high=MAX_LOGPROBS)
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = _structured_outputs(self.structured_outputs)
        _check(
            self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
            f"structured_outputs={self.structured_outputs!r} must be a StructuredOutputsParams",
        )

    @property
    def penalizes_history(self) -> bool:
        """Whether sampling reads the tokens so far (a repetition, presence or frequency penalty)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def check_token_ids(self, vocab_size: int) -> None:
        """Token ids given by the user must exist; checked when a request arrives, since the
        params alone do not know the model."""
        for token_id in (self.logit_bias or {}):
            _check(token_id < vocab_size, f"logit_bias token id {token_id} must be < vocab_size={vocab_size}")
        for token_id in self.stop_token_ids:
            _check(token_id < vocab_size, f"stop_token_ids entry {token_id} must be < vocab_size={vocab_size}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(params: SamplingParams, name: str, low: int | None = None, high: int | None = None) -> None:
    value = getattr(params, name)
    _check(_is_int(value), f"{name}={value!r} must be an integer")
    _check(low is None or value >= low, f"{name}={value} must be >= {low}")
    _check(high is None or value <= high, f"{name}={value} must be <= {high}")


def _number(
    params: SamplingParams, name: str, low: float | None = None, high: float | None = None, open_low: bool = False
) -> None:
    """Checks a float field against [low, high] ((low, high] when open_low) and stores it as float."""
    value = getattr(params, name)
    _check(
        (_is_int(value) or isinstance(value, float)) and math.isfinite(value),
        f"{name}={value!r} must be a finite number",
    )
    if (low is not None and (value <= low if open_low else value < low)) or (high is not None and value > high):
        if low is not None and high is not None:
            allowed = f"in {'(' if open_low else '['}{low:g}, {high:g}]"
        elif low is not None:
            allowed = f"{'>' if open_low else '>='} {low:g}"
        else:
            allowed = f"<= {high:g}"
        raise ValueError(f"{name}={value} must be {allowed}")
    setattr(params, name, float(value))


def _logit_bias(bias: object) -> dict[int, float]:
    _check(isinstance(bias, dict), f"logit_bias={bias!r} must be a dict of token id -> bias")
    out = {}
    for key, value in bias.items():
        # JSON (OpenAI clients, our own step plan) turns the int keys into strings.
        token_id = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        _check(_is_int(token_id) and token_id >= 0, f"logit_bias key {key!r} must be a token id >= 0")
        _check(
            (_is_int(value) or isinstance(value, float)) and abs(value) <= MAX_LOGIT_BIAS,
            f"logit_bias[{token_id}]={value!r} must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
        )
        out[token_id] = float(value)
    return out


def _structured_outputs(given: dict) -> StructuredOutputsParams:
    known = {f.name for f in fields(StructuredOutputsParams)}
    unknown = sorted(set(given) - known)
    _check(not unknown, f"structured_outputs: unknown fields {unknown}; known: {sorted(known)}")
    return StructuredOutputsParams(**given)


def _stop_strings(stop: object) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    _check(isinstance(stop, (list, tuple)), f"stop={stop!r} must be a string or a list of strings")
    for i, s in enumerate(stop):
        _check(isinstance(s, str) and s != "", f"stop[{i}]={s!r} must be a non-empty string")
    return list(stop)


def _stop_token_ids(ids: object) -> list[int]:
    if ids is None:
        return []
    _check(isinstance(ids, (list, tuple)), f"stop_token_ids={ids!r} must be a list of token ids")
    for i, token_id in enumerate(ids):
        _check(_is_int(token_id) and token_id >= 0, f"stop_token_ids[{i}]={token_id!r} must be a token id >= 0")
    return list(ids)
