"""POST /v1/completions, OpenAI's (legacy) completions.

A prompt or a batch (text or token ids); choice `i * n + j` is sample j of prompt i. `echo`
returns the prompt before the completion, with prompt logprobs when `logprobs` is set;
`max_tokens: 0` with `echo` scores the prompt without generating (how lm-eval-harness computes
log-likelihoods): the engine runs the prompt and one sampled token, which is dropped. Streamed,
each chunk carries one choice's new text (the prompt first, with echo) and `finish_reason` null
until its last; `stream_options.include_usage` adds a last chunk with no choices and the usage
(every other chunk then carries `"usage": null`); `data: [DONE]` ends the stream.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from tpserve.engine.outputs import CompletionOutput, RequestOutput
from tpserve.engine.sequence import Logprob
from tpserve.server.errors import bad_request
from tpserve.server.openai_api import OpenAIJob, TokenText, finite, runner_of, usage
from tpserve.server.params import compile_structured_outputs, resolve_max_tokens, sampling_params, tokenize
from tpserve.server.protocol import CompletionRequest
from tpserve.server.runner import Runner
from tpserve.server.stream_state import StreamState
from tpserve.server.streaming import event_stream

router = APIRouter()


def completion_logprobs(entries: list[Logprob | None], token_ids: list[int], text: TokenText, start: int) -> dict:
    """OpenAI's legacy logprobs object. `entries[k]` belongs to `token_ids[k]`; None for a prompt's
    first token (nothing before it to predict it). Offsets count characters from `start`."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        piece = text(token_id)
        offsets.append(start)
        start += len(piece)
        tokens.append(piece)
        if entry is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(finite(entry.logprob))
        alternatives = {text(t): finite(lp) for t, lp in entry.top.items()}
        alternatives.setdefault(piece, finite(entry.logprob))  # the chosen token, as vLLM shows it
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


class _CompletionJob(OpenAIJob):
    """One /v1/completions request: its prompts, and how outputs become choices."""

    def __init__(self, body: CompletionRequest, runner: Runner, request_id: str, text: TokenText) -> None:
        super().__init__(body, runner, request_id, text, "cmpl", "text_completion")
        if body.suffix:
            raise bad_request("suffix is not supported (no fill-in-the-middle)", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise bad_request(f"best_of={body.best_of} must equal n={body.n}: tpserve does not rank samples",
                              param="best_of")
        if body.max_tokens == 0 and not body.echo:
            raise bad_request("max_tokens=0 generates nothing: use it with echo=true to score the prompt, or ask "
                              "for at least 1 token", param="max_tokens")
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise bad_request("the prompt is empty", param="prompt")
        runner.check_batch(len(prompts))
        client = runner.client
        self.prompt_ids = [tokenize(client, p) for p in prompts]
        self.prompt_texts = [p if isinstance(p, str) else client.tokenizer.decode(p) for p in prompts]
        self.scoring = body.max_tokens == 0
        want_prompt_logprobs = body.prompt_logprobs
        if body.echo and body.logprobs is not None:
            want_prompt_logprobs = max(body.logprobs, body.prompt_logprobs or 0)
        self.params = [
            sampling_params(
                body, 1 if self.scoring else resolve_max_tokens(len(ids), body.max_tokens, client.max_model_len),
                client, logprobs=body.logprobs,
                prompt_logprobs=want_prompt_logprobs,
            )
            for ids in self.prompt_ids
        ]
        self.n = body.n
        self.state = StreamState()
        # Streaming: the choices that have sent a chunk, and each one's text offset so far.
        self.started: set[int] = set()
        self.offsets: dict[int, int] = {}

    def choice(self, i: int, out: RequestOutput, o: CompletionOutput) -> dict:
        """The whole choice (non-streaming)."""
        echo = self.prompt_texts[i] if self.body.echo else ""
        entries, ids = self._logprob_entries(out, o, 0, True)
        return {
            "index": i * self.n + o.index,
            "text": echo + ("" if self.scoring else o.text),
            "logprobs": completion_logprobs(entries, ids, self.text, 0) if self.body.logprobs is not None else None,
            "finish_reason": "length" if self.scoring else o.finish_reason,
            "stop_reason": o.stop_reason,
            "prompt_logprobs": prompt_logprobs_json(out) if self.body.prompt_logprobs is not None else None,
        }

    def _logprob_entries(self, out: RequestOutput, o: CompletionOutput, from_token: int, with_prompt: bool):
        entries: list[Logprob | None] = []
        ids: list[int] = []
        if with_prompt and self.body.echo and self.body.logprobs is not None:
            entries += out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            ids += out.prompt_token_ids
        if not self.scoring and self.body.logprobs is not None:
            entries += (o.logprobs or [])[from_token:]
            ids += o.token_ids[from_token:]
        return entries, ids

    def response(self, outs: list[RequestOutput]) -> dict:
        choices = [self.choice(i, out, o) for i, out in enumerate(outs) for o in out.outputs]
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.runner.config.model_name, "choices": choices, "usage": usage(outs, self.scoring)}

    # --- streaming ---
    def render(self, batch: dict[int, RequestOutput]) -> list[str]:
        """Chunks of a batch of deltas (the state has folded them already)."""
        lines = []
        for i, delta in sorted(batch.items()):
            whole = self.state.outputs[i]
            for o in delta.outputs:
                index = i * self.n + o.index
                first = index not in self.started
                text = "" if self.scoring else o.text
                entries, ids = self._logprob_entries(whole, o, 0, first)
                if first and self.body.echo:
                    text = self.prompt_texts[i] + text
                finish = ("length" if self.scoring else o.finish_reason) if o.finished else None
                if not text and not ids and finish is None:
                    continue
                start = self.offsets.get(index, 0)
                logprobs = completion_logprobs(entries, ids, self.text, start) if self.body.logprobs is not None else None
                if logprobs is not None:
                    self.offsets[index] = start + sum(len(t) for t in logprobs["tokens"])
                self.started.add(index)
                lines.append(self.chunk([{"index": index, "text": text, "logprobs": logprobs,
                                           "finish_reason": finish, "stop_reason": o.stop_reason if finish else None}]))
        return lines

    def end(self) -> list[str]:
        return self.usage_chunk(self.state.finished(), self.scoring)


def prompt_logprobs_json(out: RequestOutput) -> list[dict | None] | None:
    """vLLM's prompt_logprobs: per prompt token, {token id: {"logprob": ...}} (None for the first)."""
    if out.prompt_logprobs is None:
        return None
    result = []
    for token_id, entry in zip(out.prompt_token_ids, out.prompt_logprobs):
        if entry is None:
            result.append(None)
            continue
        item = {str(t): {"logprob": finite(lp)} for t, lp in entry.top.items()}
        item[str(token_id)] = {"logprob": finite(entry.logprob)}
        result.append(item)
    return result


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    runner = runner_of(request)
    runner.check_available()
    job = _CompletionJob(body, runner, request.state.request_id, request.app.state.token_text)
    await compile_structured_outputs(runner.client, body, job.params)
    if body.stream:
        outputs = runner.stream(job.id, job.prompt_ids, job.params, job.state)
        return await event_stream(outputs, job.render, job.end)
    outs = await runner.final(job.id, job.prompt_ids, job.params, request.is_disconnected)
    return job.response(outs)
