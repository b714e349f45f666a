"""Running engine requests for the routes: admission, deadlines, merged streams, metrics.

Admission bounds memory: at most `max_num_seqs + max_queued_requests` engine requests are in
the server at once (those running, those waiting for a slot); one more is refused at once with
429 and Retry-After, before anything is queued. A shutting-down server or a dead engine
answers 503.

A route that runs several engine requests (a completion with several prompts) reads them as one
stream of deltas. A pump task per request merges the deltas the reader has not taken yet into
one, and the reader takes whatever changed since it last looked: a slow client gets several
steps' text in one delta, and what waits for it in memory is only what it has not been sent.
Leaving the stream (a client gone, a deadline passed, an error) cancels the pumps, which aborts
the engine requests and frees their KV blocks.

    client.generate(0) --pump--> pending[0] --\
    client.generate(1) --pump--> pending[1] ----> changed -> reader: {index: merged delta}
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from tpserve.engine.client import EngineClient, EngineDeadError
from tpserve.engine.outputs import RequestOutput
from tpserve.engine.sampling_params import SamplingParams
from tpserve.server.errors import APIError, engine_dead
from tpserve.server.metrics import Metrics
from tpserve.server.stream_state import StreamState


@dataclass
class ServerConfig:
    model_name: str  # the `model` clients name; requests naming another get 404
    api_key: str | None = None
    max_queued_requests: int = 256
    max_request_bytes: int = 10 << 20
    request_timeout: float | None = 600.0
    shutdown_timeout: float = 30.0
    ready_timeout: float = 30.0
    # --chat-template: replaces the checkpoint's template for every chat request.
    chat_template: str | None = None
    # The template for requests with tools when the checkpoint's own cannot render them (the
    # default model's: tpserve's Hermes-style ChatML tool template).
    tool_chat_template: str | None = None
    tool_call_parser: str = "hermes"  # --tool-call-parser, vLLM's names


class Runner:
    def __init__(self, client: EngineClient, config: ServerConfig, metrics: Metrics) -> None:
        self.client = client
        self.config = config
        self.metrics = metrics
        self.capacity = client.max_num_seqs + config.max_queued_requests
        self.active = 0  # engine requests admitted and not yet done
        self.draining = False
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.client.max_model_len

    def check_available(self) -> None:
        if self.draining:
            self.metrics.rejected.labels("shutting_down").inc()
            raise APIError(503, "the server is shutting down and takes no new requests", code="shutting_down",
                           headers={"Retry-After": "5"})
        if not self.client.is_healthy:
            self.metrics.rejected.labels("engine_dead").inc()
            raise engine_dead(self.client.error)

    def check_batch(self, count: int) -> None:
        """A batch that could never be admitted, even into an idle server, is a client error."""
        if count > self.capacity:
            raise APIError(400, f"a batch of {count} prompts exceeds what this server holds at once ({self.capacity}: "
                           "--max-num-seqs plus --max-queued-requests); split it", param="prompt")

    def admit(self, count: int) -> None:
        """Reserve `count` engine requests, or refuse the HTTP request (400/429/503)."""
        self.check_available()
        self.check_batch(count)
        if self.active + count > self.capacity:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(
                429, f"the server is full: {self.active} requests are running or queued (at most "
                f"{self.capacity}: --max-num-seqs plus --max-queued-requests); retry later",
                code="queue_full", headers={"Retry-After": "1"},
            )
        self.active += count

    def engine_ids(self, base: str, count: int) -> list[str]:
        """Engine request ids: unique even when clients reuse an X-Request-Id."""
        tag = f"{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        return [f"{base}-{tag}-{i}" for i in range(count)]

    async def stream(
        self, base_id: str, prompts: list[list[int]], params: list[SamplingParams], state: StreamState
    ) -> AsyncIterator[dict[int, RequestOutput]]:
        """Deltas of one engine request per prompt, as {prompt index: delta} for those that
        moved, until all have finished; each batch is folded into `state` before it is yielded.
        Raises APIError 504 past the request timeout and 503 when the engine dies; leaving early
        aborts what still runs."""
        self.admit(len(prompts))
        merged = _Merged(self.client, self.engine_ids(base_id, len(prompts)), prompts, params)
        timeout = self.config.request_timeout
        deadline = time.monotonic() + timeout if timeout else None
        ended = "cancelled"  # why unfinished requests are aborted: a client gone, a server stopping
        try:
            while True:
                batch = await merged.next(deadline)
                if batch is None:
                    return
                state.add(batch)
                for i, delta in batch.items():
                    if delta.finished:
                        self.metrics.on_finished(state.outputs[i])
                yield batch
        except TimeoutError:
            ended = "timeout"
            raise APIError(504, f"the request did not finish within --request-timeout={timeout:g} s and was "
                           "aborted", code="timeout") from None
        except EngineDeadError as e:
            ended = "engine_dead"
            raise engine_dead(str(e)) from None
        except ValueError as e:  # the engine refused the request (a request id already running)
            ended = "error"
            raise APIError(400, str(e)) from None
        except Exception:
            ended = "error"
            raise
        finally:
            unfinished = merged.close()
            if unfinished:
                self.metrics.aborted.labels(ended).inc(unfinished)
            self.active -= len(prompts)

    async def final(self, base_id: str, prompts: list[list[int]], params: list[SamplingParams],
                    is_disconnected=None) -> list[RequestOutput]:
        """The finished outputs, in prompt order (non-streaming routes). `is_disconnected`, an
        async callable, is asked every half second: a client gone aborts the requests."""
        state = StreamState()

        async def collect() -> None:
            async for _ in self.stream(base_id, prompts, params, state):
                pass

        task = asyncio.create_task(collect())
        try:
            while not task.done():
                await asyncio.wait([task], timeout=0.5)
                if not task.done() and is_disconnected is not None and await is_disconnected():
                    task.cancel()
                    raise APIError(499, "the client closed the connection", code="client_closed")
            task.result()
        finally:
            task.cancel()
        return [state.outputs[i] for i in range(len(prompts))]


class _Merged:
    def __init__(self, client: EngineClient, ids: list[str], prompts: list[list[int]],
                 params: list[SamplingParams]) -> None:
        self.pending: dict[int, RequestOutput] = {}  # deltas not taken yet, merged per request
        self.error: BaseException | None = None
        self.num_done = 0
        self.num_finished = 0
        self.changed = asyncio.Event()
        self.tasks = [
            asyncio.create_task(self._pump(i, client.generate(p, sp, rid)))
            for i, (rid, p, sp) in enumerate(zip(ids, prompts, params))
        ]

    async def _pump(self, index: int, outputs: AsyncIterator[RequestOutput]) -> None:
        try:
            async for delta in outputs:
                pending = self.pending.get(index)
                if pending is None:
                    self.pending[index] = delta
                else:
                    pending.add(delta)
                self.num_finished += delta.finished
                self.changed.set()
        except Exception as e:  # noqa: BLE001 - handed to the reader
            self.error = self.error or e
        finally:
            self.num_done += 1
            self.changed.set()

    async def next(self, deadline: float | None) -> dict[int, RequestOutput] | None:
        """What changed since the last call; None once every request has finished."""
        while True:
            if self.error is not None:
                raise self.error
            if self.pending:
                batch, self.pending = self.pending, {}
                return batch
            if self.num_done == len(self.tasks):
                return None
            self.changed.clear()
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            await asyncio.wait_for(self.changed.wait(), remaining)

    def close(self) -> int:
        """Cancel what still runs (an unfinished client.generate, closed, aborts its request and
        frees its blocks); how many requests had not finished."""
        for task in self.tasks:
            task.cancel()
        return len(self.tasks) - self.num_finished
