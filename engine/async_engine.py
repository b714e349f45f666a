"""`AsyncLLMEngine`: the engine loop on its own thread, requests as async iterators.

The HTTP event loop never runs a model step: it only puts commands in an inbox and awaits
outputs. The engine thread takes commands between steps, runs steps while there is work,
and hands each output to its request's asyncio queue on the request's loop.

    HTTP loop                         engine thread
    generate() ─ add ─> inbox ──────> add_request ─> step ─> step ─> ...
         ^                                              |
         └── asyncio.Queue <── call_soon_threadsafe ────┘
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
from typing import AsyncIterator

from tpserve.engine.config import EngineConfig
from tpserve.engine.executor import EngineDeadError
from tpserve.engine.llm_engine import LLMEngine
from tpserve.engine.outputs import RequestOutput
from tpserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self.error: str | None = None
        # Replaced (never changed) by the engine thread after each step: readable from any thread.
        self.stats = self.engine.stats()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tpserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it runs (cumulative), the last one with finished=True.

        Bad input raises ValueError before anything is queued. Leaving the iteration early
        (a client that went away) aborts the request and frees its blocks.
        """
        token_ids = self.engine.validate(prompt, params)
        whole = None
        # aclosing: a reader that leaves early closes the deltas at once, which aborts the request.
        async with contextlib.aclosing(self.deltas(prompt, token_ids, params, request_id)) as deltas:
            async for delta in deltas:
                if whole is None:
                    whole = RequestOutput.start(delta)
                else:
                    whole.add(delta)
                yield whole.copy()

    async def deltas(
        self, prompt: str | list[int], token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """The deltas of one request (see `outputs`), the last one with finished=True. `token_ids`
        and `params` are checked already (`LLMEngine.validate`): they are not checked again.
        Leaving the iteration early aborts the request and frees its blocks."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        # Compiled here, off the engine thread, which must never wait for a grammar.
        grammar = await self.compile_grammar(params)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._send(("add", request_id, prompt, params, token_ids, grammar))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def compile_grammar(self, params: SamplingParams):
        """params.structured_outputs compiled (cached), or None without one; ValueError naming the
        problem when it cannot be compiled in the compiler's time limit."""
        if params.structured_outputs is None:
            return None
        return await self.engine.grammars.compile_async(params.structured_outputs)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def _send(self, command: tuple) -> None:
        self._inbox.put(command)
        self._wake.set()

    def _push(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _take_commands(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt, params, token_ids, grammar = command
                try:
                    self.engine.add_request(request_id, prompt, params, prompt_token_ids=token_ids, grammar=grammar)
                except ValueError as e:
                    self._push(request_id, e)
            elif command[0] == "abort":
                last = self.engine.abort_request(command[1])
                if last is not None:  # a reader still waiting gets the end: finish_reason "abort"
                    self._push(command[1], last)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._take_commands()
                if not self.engine.has_unfinished_requests():
                    # Idle: wait for work, and look at the workers' health now and then.
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    self.engine.executor.check()
                    self.stats = self.engine.stats()
                    continue
                for output in self.engine.step():
                    self._push(output.request_id, output)
                self.stats = self.engine.stats()
        except BaseException as e:  # the engine is dead: fail every request, now and later
            self.error = str(e) if isinstance(e, EngineDeadError) else f"engine loop failed: {e!r}"
            logger.error("engine stopped: %s", self.error)
            self._fail_all()

    def _fail_all(self) -> None:
        error = EngineDeadError(self.error)
        for request_id in list(self._streams):
            self._push(request_id, error)
        self.engine.executor.shutdown()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        if self.error is None:
            self.error = "the engine was shut down"
            self._fail_all()
