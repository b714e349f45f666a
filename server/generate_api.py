"""POST /generate: the engine as it is, one prompt (text or token ids), every sampling parameter.

    {"prompt": "Hello", "max_tokens": 32, "temperature": 0, "stream": true, ...}

Structured outputs as on the OpenAI routes: `response_format` or `structured_outputs`
(`{"json": schema}`, `{"regex": ...}`, `{"choice": [...]}`, `{"grammar": ...}`).

Not streamed, the answer holds every sample whole:

    {"id": ..., "outputs": [{"index", "text", "token_ids", "finish_reason", "stop_reason",
     "cumulative_logprob", "logprobs"}], "prompt_token_ids": [...], "prompt_logprobs": ...,
     "usage": {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}}

Streamed, Server-Sent Events: one event per sample that moved, with what it added

    data: {"id": ..., "index": 0, "text": " world", "token_ids": [1917], "finish_reason": null}

(`finish_reason` set on the sample's last delta), then one final event

    data: {"id": ..., "finished": true, "outputs": [{"index", "finish_reason", "stop_reason"}],
           "usage": {...}}

Logprobs are `{"token_id", "logprob", "top": {"<id>": logprob}}` per token.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from tpserve.engine.outputs import RequestOutput
from tpserve.engine.sequence import Logprob
from tpserve.server.openai_api import finite, runner_of, usage
from tpserve.server.params import compile_structured_outputs, resolve_max_tokens, sampling_params, tokenize
from tpserve.server.protocol import GenerateRequest
from tpserve.server.stream_state import StreamState
from tpserve.server.streaming import event_stream, sse

router = APIRouter()


def logprobs_json(entries: list[Logprob | None] | None) -> list[dict | None] | None:
    if entries is None:
        return None
    return [None if e is None else {"token_id": e.token_id, "logprob": finite(e.logprob),
                                    "top": {str(t): finite(lp) for t, lp in e.top.items()}} for e in entries]


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    runner = runner_of(request)
    runner.check_available()
    client = runner.client
    request_id = request.state.request_id
    prompt_ids = tokenize(client, body.prompt)
    params = sampling_params(
        body, resolve_max_tokens(len(prompt_ids), body.max_tokens, client.max_model_len), client,
        logprobs=body.logprobs, prompt_logprobs=body.prompt_logprobs,
    )
    await compile_structured_outputs(client, body, [params])
    if not body.stream:
        (out,) = await runner.final(request_id, [prompt_ids], [params], request.is_disconnected)
        return {
            "id": request_id,
            "outputs": [{"index": o.index, "text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason,
                         "stop_reason": o.stop_reason, "cumulative_logprob": finite(o.cumulative_logprob),
                         "logprobs": logprobs_json(o.logprobs)} for o in out.outputs],
            "prompt_token_ids": out.prompt_token_ids,
            "prompt_logprobs": logprobs_json(out.prompt_logprobs),
            "usage": usage([out]),
        }

    state = StreamState()

    def render(batch: dict[int, RequestOutput]) -> list[str]:
        lines = []
        for o in batch[0].outputs:
            if not o.text and not o.token_ids and not o.finished:
                continue
            event = {"id": request_id, "index": o.index, "text": o.text, "token_ids": o.token_ids,
                     "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
            if o.logprobs is not None:
                event["logprobs"] = logprobs_json(o.logprobs)
            whole = state.outputs[0]
            if o.finished and whole.prompt_logprobs is not None:
                event["prompt_logprobs"] = logprobs_json(whole.prompt_logprobs)
            lines.append(sse(event))
        return lines

    def end() -> list[str]:
        out = state.outputs[0]
        return [sse({"id": request_id, "finished": True,
                     "outputs": [{"index": o.index, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                                 for o in out.outputs],
                     "usage": usage([out])})]

    return await event_stream(runner.stream(request_id, [prompt_ids], [params], state), render, end,
                              done_line=False)
