"""What the engine returns, in vLLM's shape: a `RequestOutput` holding one `CompletionOutput`
per sample.

`LLMEngine.step()` returns deltas (vLLM's `RequestOutputKind.DELTA`): for each request that
moved, only its samples that moved, each with the text, token ids and logprobs it added in
that step; `finish_reason` set on a sample's last delta; `cumulative_logprob` the running total;
`prompt_logprobs` on the request's first delta only. A caller that wants whole outputs folds
the deltas with `RequestOutput.add` (`LLM.generate`, `AsyncLLMEngine.generate`, the server's
non-streaming routes), so no step copies what a request has made so far.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tpserve.engine.sequence import Logprob


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[Logprob] | None  # one per output token when asked
    finish_reason: str | None = None  # "stop", "length", "abort"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[Logprob | None] | None  # None for the first prompt token
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(0.0))

    @classmethod
    def start(cls, delta: RequestOutput) -> RequestOutput:
        """A whole output to fold deltas into, beginning with `delta` (which stays unchanged)."""
        whole = dataclasses.replace(delta, outputs=[])
        whole.add(delta)
        return whole

    def add(self, delta: RequestOutput) -> None:
        """Fold a later delta of the same request into this whole output (or a merged delta)."""
        self.finished = delta.finished
        self.num_cached_tokens = delta.num_cached_tokens
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        for d in delta.outputs:
            o = self._sample(d.index)
            if o is None:
                self.outputs.append(CompletionOutput(
                    d.index, d.text, list(d.token_ids), d.cumulative_logprob,
                    list(d.logprobs) if d.logprobs is not None else None, d.finish_reason, d.stop_reason,
                ))
                self.outputs.sort(key=lambda c: c.index)
                continue
            o.text += d.text
            o.token_ids += d.token_ids
            if d.logprobs is not None:
                if o.logprobs is None:
                    o.logprobs = []
                o.logprobs += d.logprobs
            o.cumulative_logprob = d.cumulative_logprob
            o.finish_reason, o.stop_reason = d.finish_reason, d.stop_reason

    def _sample(self, index: int) -> CompletionOutput | None:
        if index < len(self.outputs) and self.outputs[index].index == index:
            return self.outputs[index]  # every sample present, in order: the usual case
        return next((o for o in self.outputs if o.index == index), None)

    def copy(self) -> RequestOutput:
        """A copy no later `add` changes."""
        return dataclasses.replace(self, outputs=[
            dataclasses.replace(o, token_ids=list(o.token_ids),
                                logprobs=list(o.logprobs) if o.logprobs is not None else None)
            for o in self.outputs
        ])
