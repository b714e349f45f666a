"""What the OpenAI-compatible routes share: the request checks, ids and stream chunks common to
both (`OpenAIJob`), usage, log-probability values and token texts, and GET /v1/models. The
routes: completions_api.py and chat_api.py.

Answers, streamed or not, have OpenAI's shape, so the official SDK and evaluation harnesses work
unchanged.
"""

from __future__ import annotations

import math
import time

from fastapi import APIRouter, Request

from tpserve.engine.outputs import RequestOutput
from tpserve.server.errors import APIError, bad_request
from tpserve.server.runner import Runner
from tpserve.server.streaming import sse

router = APIRouter()


def runner_of(request: Request) -> Runner:
    return request.app.state.runner


def check_model(runner: Runner, model: str | None) -> None:
    if model is not None and model != runner.config.model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{runner.config.model_name}` "
                       "(GET /v1/models)", param="model", code="model_not_found")


def usage(outs: list[RequestOutput], scoring: bool = False) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = 0 if scoring else sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs)}}


class OpenAIJob:
    """What a completions or chat request shares: the checks every OpenAI request gets, its id,
    and the envelope of its stream chunks (with `stream_options.include_usage`, each chunk has
    `"usage": null` and a last chunk carries the usage)."""

    def __init__(self, body, runner: Runner, request_id: str, text: "TokenText", id_prefix: str,
                 chunk_object: str) -> None:
        check_model(runner, body.model)
        if body.stream_options is not None and not body.stream:
            raise bad_request("stream_options is only allowed with stream=true", param="stream_options")
        self.body, self.runner, self.text = body, runner, text
        self.id = f"{id_prefix}-{request_id}"
        self.created = int(time.time())
        self.chunk_object = chunk_object
        self.include_usage = body.stream_options is not None and body.stream_options.include_usage

    def chunk(self, choices: list[dict]) -> str:
        payload = {"id": self.id, "object": self.chunk_object, "created": self.created,
                   "model": self.runner.config.model_name, "choices": choices}
        if self.include_usage:
            payload["usage"] = None
        return sse(payload)

    def usage_chunk(self, outs: list[RequestOutput], scoring: bool = False) -> list[str]:
        if not self.include_usage or not outs:
            return []
        return [sse({"id": self.id, "object": self.chunk_object, "created": self.created,
                     "model": self.runner.config.model_name, "choices": [], "usage": usage(outs, scoring)})]


# JSON has no infinities: a token that sampling made impossible (top_p, top_k, a -100 bias) or a
# prompt token the model finds impossible gets vLLM's stand-in for -inf.
MIN_LOGPROB = -9999.0


def finite(logprob: float | None) -> float | None:
    if logprob is None or math.isfinite(logprob):
        return logprob
    return MIN_LOGPROB if logprob < 0 or math.isnan(logprob) else -MIN_LOGPROB


class TokenText:
    """The text of single tokens, for logprobs (cached: the same ids come back all the time)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.cache[token_id] = self.tokenizer.decode([token_id])
        return text


# --- /v1/models ---
@router.get("/v1/models")
async def models(request: Request) -> dict:
    runner = runner_of(request)
    return {"object": "list", "data": [{
        "id": runner.config.model_name, "object": "model", "created": int(request.app.state.started),
        "owned_by": "tpserve", "max_model_len": runner.max_model_len,
    }]}
