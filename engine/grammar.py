"""Grammars for structured outputs: compiled once per constraint, matched per sequence, masked per step.

llguidance (README, "Structured outputs": why it and not xgrammar) does the work on the CPU of
the engine's process:

    StructuredOutputsParams --GrammarCompiler--> CompiledGrammar (LRU-cached, built off the engine thread)
    CompiledGrammar.matcher()  -> one LLMatcher per sample; Request advances it with each token
    fill_bitmasks(matchers)    -> [k, ceil(V / 32)] int32, bit j of row r: token j is allowed

Compiling runs on a small thread pool with a time limit, so a pathological schema is refused
(ValueError, a 400 at the server) without stalling the engine loop. llguidance's own parser
limits bound the work of each later mask step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np
from llguidance.gbnf_to_lark import any_to_lark

from tpserve.engine.structured_outputs import StructuredOutputsParams

# JSON output with no free whitespace (compact separators): a small model left to choose could
# spend all its tokens on spaces and newlines inside the object.
_JSON_OPTIONS = {"whitespace_flexible": False}


class CompiledGrammar:
    """A compiled constraint: a matcher at its start state, copied for every sample that uses it."""

    def __init__(self, prototype: llguidance.LLMatcher) -> None:
        self._prototype = prototype

    def matcher(self) -> llguidance.LLMatcher:
        return self._prototype.deep_copy()


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint (not checked yet: building its matcher checks it)."""
    if spec.json is not None or spec.json_object:
        schema = spec.json if spec.json is not None else {"type": "object"}
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as e:
            raise ValueError(f"structured outputs json: {e}") from None
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        # Lark string literals take JSON's escapes, so any choice text is written exactly.
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    return llguidance.LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))


def _kind(spec: StructuredOutputsParams) -> str:
    for name in ("json", "regex", "choice", "grammar"):
        if getattr(spec, name) is not None:
            return name
    return "json_object"


class GrammarCompiler:
    """Compiles constraints for one tokenizer, off the caller's thread, with a time limit and a
    bounded LRU cache of results (compiled grammars and the errors of bad ones alike)."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: list[int], cache_size: int = 128,
                 timeout: float = 10.0, num_threads: int = 2) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._eos_token_ids = eos_token_ids
        self._tokenizer: llguidance.LLTokenizer | None = None  # built by the first compilation
        self._tokenizer_lock = threading.Lock()
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.timeout = timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="tpserve-grammar")
        self._lock = threading.Lock()
        self._done: OrderedDict[str, CompiledGrammar | ValueError] = OrderedDict()
        self._running: dict[str, concurrent.futures.Future] = {}

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled grammar, waiting at most `timeout` seconds; ValueError naming the problem."""
        try:
            return self._future(spec).result(self.timeout)
        except concurrent.futures.TimeoutError:
            raise self._timed_out(spec) from None

    async def compile_async(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """`compile` for an event loop: it waits without blocking the loop."""
        try:
            # shield: a timed-out wait must not cancel the shared compilation other requests wait on
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._future(spec))), self.timeout)
        except TimeoutError:
            raise self._timed_out(spec) from None

    def _timed_out(self, spec: StructuredOutputsParams) -> ValueError:
        return ValueError(f"structured outputs {_kind(spec)}: the grammar did not compile within {self.timeout:g} s; "
                          "simplify it")

    def _future(self, spec: StructuredOutputsParams) -> concurrent.futures.Future:
        """A future of the result: done at once from the cache, else the compilation under way."""
        key = spec.key()
        with self._lock:
            done = self._done.get(key)
            if done is not None:
                self._done.move_to_end(key)
                future = concurrent.futures.Future()
                future.set_exception(done) if isinstance(done, ValueError) else future.set_result(done)
                return future
            future = self._running.get(key)
            if future is None:
                future = self._running[key] = self._pool.submit(self._build, key, spec)
            return future

    def _build(self, key: str, spec: StructuredOutputsParams) -> CompiledGrammar:
        try:
            result: CompiledGrammar | ValueError = self._matcher(spec)
        except ValueError as e:
            result = e
        with self._lock:
            self._running.pop(key, None)
            self._done[key] = result
            while len(self._done) > self.cache_size:
                self._done.popitem(last=False)
        if isinstance(result, ValueError):
            raise result
        return result

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary: ~1 s to build for 49k tokens, so only once a
        request asks for structured outputs. n_vocab is the model's: ids the tokenizer lacks are
        never allowed."""
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_token_ids)
            return self._tokenizer

    def _matcher(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        text = grammar_text(spec)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, self.tokenizer)
        if is_error:
            raise ValueError(f"structured outputs {_kind(spec)} cannot be compiled: {messages[0]}")
        matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured outputs {_kind(spec)} cannot be compiled: {matcher.get_error()}")
        return CompiledGrammar(matcher)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class BitmaskFiller:
    """The allowed-token bitmasks of a step's constrained sequences, computed in parallel threads."""

    def __init__(self, vocab_size: int) -> None:
        self.words = (vocab_size + 31) // 32  # int32 words per mask
        self._executor = llguidance.LLExecutor()

    def fill(self, matchers: list[llguidance.LLMatcher]) -> np.ndarray:
        """[len(matchers), words] int32; bit j of row r (word j // 32, bit j % 32) allows token j."""
        masks = np.zeros((len(matchers), self.words), dtype=np.int32)
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], masks)
        return masks
