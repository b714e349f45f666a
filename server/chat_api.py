"""POST /v1/chat/completions, OpenAI's chat, through the checkpoint's chat template.

Streamed as OpenAI streams it: for each choice a first chunk with the role
(`{"role": "assistant", "content": ""}`), then content deltas, then an empty delta with the
`finish_reason` (null in every chunk before); `stream_options.include_usage` adds a last chunk
with no choices and the usage; `data: [DONE]` ends the stream.

Tools (OpenAI's `tools` and `tool_choice`): the template renders the functions, the output is
parsed into `tool_calls` by the server's tool-call parser (server/tool_parsers.py), and
"required" or a named function is forced by structured outputs against the functions' parameter
schemas. A template that cannot render tools gets the server's tool template, if it has one
(the default model's), else the request is refused naming --chat-template.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.meta
from fastapi import APIRouter, Request
from jinja2 import TemplateError

from tpserve.engine.outputs import RequestOutput
from tpserve.engine.sequence import Logprob
from tpserve.engine.structured_outputs import StructuredOutputsParams
from tpserve.server.errors import bad_request
from tpserve.server.openai_api import OpenAIJob, TokenText, finite, runner_of, usage
from tpserve.server.params import compile_structured_outputs, resolve_max_tokens, sampling_params, tokenize
from tpserve.server.protocol import ChatCompletionRequest
from tpserve.server.runner import Runner
from tpserve.server.stream_state import StreamState
from tpserve.server.streaming import event_stream
from tpserve.server.tool_parsers import TOOL_PARSERS

router = APIRouter()
# The Hermes-style ChatML tool template shipped with tpserve (the default model's tool template).
HERMES_TOOL_TEMPLATE = Path(__file__).with_name("tool_chat_template_hermes.jinja")


@lru_cache(maxsize=16)
def renders_tools(template: str) -> bool:
    """Whether a chat template reads the `tools` it is given (one that does not would drop them)."""
    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in jinja2.meta.find_undeclared_variables(ast)


def chat_prompt(body: ChatCompletionRequest, tokenizer, template: str | None, tools: list[dict] | None) -> str:
    """The prompt text: the messages (and `tools`, if given) through `template`."""
    messages = []
    for k, m in enumerate(body.messages):
        message = m.model_dump(exclude_none=True)
        for call in message.get("tool_calls", []):
            # Templates write arguments as JSON themselves (`| tojson`): they take the object.
            try:
                arguments = json.loads(call["function"]["arguments"])
            except json.JSONDecodeError:
                raise bad_request(f"messages[{k}].tool_calls: arguments are not JSON: "
                                  f"{call['function']['arguments']!r}", param="messages") from None
            call["function"]["arguments"] = arguments
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.type != "text":
                    raise bad_request(f"messages[{k}]: content parts of type {part.type!r} are not supported; "
                                      "this model takes text only", param="messages")
                texts.append(part.text)
            message["content"] = "\n".join(texts)
        messages.append(message)
    if template is None:
        raise bad_request("this model's checkpoint has no chat template: use /v1/completions, or start the "
                          "server with --chat-template FILE")
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=template, tokenize=False,
            add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
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
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
        client = runner.client
        tokenizer = client.tokenizer
        tools = self._tools(body)  # the functions the model may call; None: no parsing
        self.parser = TOOL_PARSERS[runner.config.tool_call_parser] if tools else None
        self.names = {t["function"]["name"] for t in tools or ()}
        prompt = chat_prompt(body, tokenizer, self._template(body, tokenizer, tools, runner.config), tools)
        # The template writes any special tokens itself; the tokenizer must not add another BOS.
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        self.prompt_ids = tokenize(client, ids, param="messages")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = resolve_max_tokens(len(self.prompt_ids), asked, client.max_model_len)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        self.params = sampling_params(body, max_tokens, client, logprobs=logprobs)
        self.forced = self._forced_grammar(body, tools)
        if self.forced is not None:
            self.params = dataclasses.replace(self.params, structured_outputs=self.forced)
        self.state = StreamState()
        self.started: set[int] = set()  # choices whose role chunk went out
        self.streamers = {}  # per choice, when tools are parsed

    @staticmethod
    def _tools(body: ChatCompletionRequest) -> list[dict] | None:
        if body.tool_choice is not None and body.tool_choice != "none" and not body.tools:
            raise bad_request("tool_choice needs tools: give the functions the model may call", param="tool_choice")
        if not body.tools or body.tool_choice == "none":  # "none": the model is not told of them
            return None
        names = [t.function.name for t in body.tools]
        if len(set(names)) != len(names):
            raise bad_request(f"tools: function names must be unique, got {names}", param="tools")
        if not isinstance(body.tool_choice, str) and body.tool_choice is not None:
            name = body.tool_choice.function.name
            if name not in names:
                raise bad_request(f"tool_choice names function {name!r}, which is not in tools ({', '.join(names)})",
                                  param="tool_choice")
        if body.stream and body.logprobs:
            raise bad_request("logprobs are not streamed with tools (a call's tokens are not content); "
                              "leave out stream or logprobs", param="logprobs")
        return [t.model_dump(exclude_none=True) for t in body.tools]

    @staticmethod
    def _template(body: ChatCompletionRequest, tokenizer, tools: list[dict] | None, config) -> str | None:
        template = config.chat_template or tokenizer.chat_template
        toolish = tools is not None or any(m.tool_calls or m.role == "tool" for m in body.messages)
        if not toolish or (template is not None and renders_tools(template)):
            return template
        if config.chat_template is None and config.tool_chat_template is not None:
            return config.tool_chat_template
        raise bad_request("this model's chat template cannot render tools or tool messages; start the server with "
                          "--chat-template FILE, a template that does (e.g. tpserve's "
                          f"{HERMES_TOOL_TEMPLATE.name} for ChatML models)", param="tools")

    def _forced_grammar(self, body: ChatCompletionRequest, tools: list[dict] | None) -> StructuredOutputsParams | None:
        """"required" or a named function: one call, forced by structured outputs."""
        if tools is None or body.tool_choice in (None, "auto"):
            return None
        if self.params.structured_outputs is not None:
            raise bad_request("tool_choice required or a named function cannot be combined with response_format or "
                              "structured_outputs", param="tool_choice")
        if body.tool_choice != "required":
            tools = [t for t in tools if t["function"]["name"] == body.tool_choice.function.name]
        return StructuredOutputsParams(grammar=self.parser.grammar(tools))

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The assistant message of an output, and its finish reason ("tool_calls" if it called)."""
        if self.parser is None:
            return {"role": "assistant", "content": text}, finish_reason
        content, calls = self.parser.parse(text, self.names)
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        return ({"role": "assistant", "content": content, "tool_calls": [c.message() for c in calls]},
                "tool_calls" if finish_reason == "stop" else finish_reason)

    def response(self, out: RequestOutput) -> dict:
        choices = []
        for o in out.outputs:
            message, finish_reason = self.message(o.text, o.finish_reason)
            choices.append({
                "index": o.index,
                "message": message,
                "logprobs": {"content": chat_logprobs(o.logprobs or [], o.token_ids, self.text)}
                if self.body.logprobs else None,
                "finish_reason": finish_reason,
                "stop_reason": o.stop_reason,
            })
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
            if self.parser is not None:
                lines += self._tool_chunks(o)
                continue
            if o.text or (o.token_ids and self.body.logprobs):
                logprobs = None
                if self.body.logprobs:
                    logprobs = {"content": chat_logprobs(o.logprobs or [], o.token_ids, self.text)}
                lines.append(self._chunk(o.index, {"content": o.text}, logprobs))
            if o.finished:
                lines.append(self._chunk(o.index, {}, None, o.finish_reason, o.stop_reason))
        return lines

    def _tool_chunks(self, o) -> list[str]:
        streamer = self.streamers.setdefault(o.index, self.parser.streamer(self.names))
        content, calls = streamer.feed(o.text, final=o.finished)
        lines = [self._chunk(o.index, {"content": content})] if content else []
        lines += [self._chunk(o.index, {"tool_calls": [call]}) for call in calls]
        if o.finished:
            finish = "tool_calls" if streamer.calls and o.finish_reason == "stop" else o.finish_reason
            lines.append(self._chunk(o.index, {}, None, finish, o.stop_reason))
        return lines

    def end(self) -> list[str]:
        return self.usage_chunk(self.state.finished())


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    runner = runner_of(request)
    runner.check_available()
    job = _ChatJob(body, runner, request.state.request_id, request.app.state.token_text)
    if job.forced is not None:
        try:
            await runner.client.check_structured_outputs(job.params)
        except ValueError as e:  # a parameter schema llguidance refuses
            raise bad_request(f"tools: {e}", param="tools") from None
    else:
        await compile_structured_outputs(runner.client, body, [job.params])
    if body.stream:
        outputs = runner.stream(job.id, [job.prompt_ids], [job.params], job.state)
        return await event_stream(outputs, job.render, job.end)
    (out,) = await runner.final(job.id, [job.prompt_ids], [job.params], request.is_disconnected)
    return job.response(out)
