"""Server-Sent Events: `data: <json>` lines, and the priming that gives a stream its real status.

A streamed answer starts (200 and headers) only once the first output exists: a request the
engine refuses, a full queue or a dead engine still gets its 4xx/5xx status, not a 200 followed
by an error event. An error after that point can only travel inside the stream, as OpenAI sends
it: `data: {"error": {...}}`.
"""

from __future__ import annotations

import json
from typing import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from tpserve.server.errors import APIError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def event_stream(
    outputs: AsyncIterator, render: Callable[[object], list[str]],
    end: Callable[[], list[str]], done_line: bool = True,
) -> StreamingResponse:
    """A streamed response of `outputs` (an async iterator), each item turned into SSE lines by
    `render`, then the lines of `end()`, then `data: [DONE]` when `done_line`. The first item is
    awaited before answering, so refusals keep their status."""
    try:
        first = [await outputs.__anext__()]  # APIError and friends propagate: a plain error answer
    except StopAsyncIteration:
        first = []

    async def lines() -> AsyncIterator[str]:
        try:
            for item in first:
                for line in render(item):
                    yield line
            async for item in outputs:
                for line in render(item):
                    yield line
            for line in end():
                yield line
        except APIError as e:
            yield sse(e.body())
        finally:
            await outputs.aclose()  # a client gone: cancels the engine requests (KV blocks freed)
        if done_line:
            yield DONE

    return StreamingResponse(lines(), media_type="text/event-stream", headers=SSE_HEADERS)
