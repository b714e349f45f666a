"""POST /v1/chat/completions, OpenAI's chat, through the checkpoint's chat template.

Streamed as OpenAI streams it: for each choice a first chunk with the role
(`{"role": "assistant", "content": ""}`), then content deltas, then an empty delta with the
`finish_reason` (null in every chunk before); `stream_options.include_usage` adds a last chunk
with no choices and the usage; `data: [DONE]` ends the stream.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from jinja2 import TemplateError

from tpserve.engine.outputs import RequestOutput
from tpserve.engine.sequence import Logprob
from tpserve.server.errors import bad_request
from tpserve.server.openai_api import OpenAIJob, TokenText, finite, runner_of, usage
from tpserve.server.params import compile_structured_outputs, resolve_max_tokens, sampling_params, tokenize
from tpserve.server.protocol import ChatCompletionRequest
from tpserve.server.runner import Runner
from tpserve.server.stream_state import StreamState
from tpserve.server.streaming import event_stream

router = APIRouter()


def chat_prompt(body: ChatCompletionRequest, tokenizer) -> str:
    """The prompt text: the messages through the checkpoint's chat template."""
    messages = []
    for k, m in enumerate(body.messages):
        message = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.type != "text":
                    raise bad_request(f"messages[{k}]: content parts of type {part.type!r} are not supported; "
                                      "this model takes text only", param="messages")
                texts.append(part.text)
            message["content"] = "\n".join(texts)
        messages.append(message)
    if tokenizer.chat_template is None:
        raise bad_request("this model's checkpoint has no chat template: use /v1/completions")
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
            continue_final_message=body.continue_final_message,
        )
    except (TemplateError, ValueError, TypeError) as e:
        raise bad_request(f"the chat template could not render these messages: {e}", param="messages") from None


def chat_logprobs(entries: list[Logprob], token_ids: list[int], text: TokenText) -> list[dict]:
    def item(token_id: int, logprob: float) -> dict:
        piece = text(token_id)
        return {"token": piece, "logprob": finite(logprob), "bytes": list(piece.encode("utf-8"))}

    return [{**item(t, e.logprob), "top_logprobs": [item(a, lp) for a, lp in e.top.items()]}
            for t, e in zip(token_ids, entries)]


class _ChatJob(OpenAIJob):
    def __init__(self, body: ChatCompletionRequest, runner: Runner, request_id: str, text: TokenText) -> None:
        super().__init__(body, runner, request_id, text, "chatcmpl", "chat.completion.chunk")
        if body.tools:
            raise bad_request("tools are not supported yet (no tool-call parsing); leave tools out", param="tools")
        if body.tool_choice not in (None, "none", "auto"):
            raise bad_request(f"tool_choice={body.tool_choice!r} needs tools, which are not supported yet",
                              param="tool_choice")
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
        client = runner.client
        tokenizer = client.tokenizer
        prompt = chat_prompt(body, tokenizer)
        # The template writes any special tokens itself; the tokenizer must not add another BOS.
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        self.prompt_ids = tokenize(client, ids, param="messages")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = resolve_max_tokens(len(self.prompt_ids), asked, client.max_model_len)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        self.params = sampling_params(body, max_tokens, client, logprobs=logprobs)
        self.state = StreamState()
        self.started: set[int] = set()  # choices whose role chunk went out

    def response(self, out: RequestOutput) -> dict:
        choices = [{
            "index": o.index,
            "message": {"role": "assistant", "content": o.text},
            "logprobs": {"content": chat_logprobs(o.logprobs or [], o.token_ids, self.text)} if self.body.logprobs
            else None,
            "finish_reason": o.finish_reason,
            "stop_reason": o.stop_reason,
        } for o in out.outputs]
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.runner.config.model_name, "choices": choices, "usage": usage([out])}

    def _chunk(self, index: int, delta: dict, logprobs=None, finish: str | None = None, stop_reason=None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = stop_reason
        return self.chunk([choice])

    def render(self, batch: dict[int, RequestOutput]) -> list[str]:
        """Chunks of a delta (the state has folded it already)."""
        lines = []
        for o in batch[0].outputs:
            if o.index not in self.started:  # OpenAI's first chunk: the role, no content yet
                lines.append(self._chunk(o.index, {"role": "assistant", "content": ""}))
                self.started.add(o.index)
            if o.text or (o.token_ids and self.body.logprobs):
                logprobs = None
                if self.body.logprobs:
                    logprobs = {"content": chat_logprobs(o.logprobs or [], o.token_ids, self.text)}
                lines.append(self._chunk(o.index, {"content": o.text}, logprobs))
            if o.finished:
                lines.append(self._chunk(o.index, {}, None, o.finish_reason, o.stop_reason))
        return lines

    def end(self) -> list[str]:
        return self.usage_chunk(self.state.finished())


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    runner = runner_of(request)
    runner.check_available()
    job = _ChatJob(body, runner, request.state.request_id, request.app.state.token_text)
    await compile_structured_outputs(runner.client, body, [job.params])
    if body.stream:
        outputs = runner.stream(job.id, [job.prompt_ids], [job.params], job.state)
        return await event_stream(outputs, job.render, job.end)
    (out,) = await runner.final(job.id, [job.prompt_ids], [job.params], request.is_disconnected)
    return job.response(out)
