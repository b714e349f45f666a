"""`Request`: one client request in the engine: its samples, their text, and when they stop.

The scheduler sees only sequences; this object turns their tokens into text (incremental
detokenization) and applies the stop conditions in this order, for each new token:

    1. eos (unless ignore_eos) or a stop token id  -> "stop"
    2. the structured-output grammar is complete   -> "stop"
    3. a stop string in the text                   -> "stop", text cut before it (or after it)
    4. max_tokens, or the model's length reached   -> "length"

A constrained request has one grammar matcher per sample, advanced by each token it accepts
here; the engine reads them for the next step's bitmasks. Preemption keeps a sequence's tokens,
so its matcher stays where it was.

min_tokens is enforced by the sampler (eos and stop ids are banned until then); stop
strings are looked for only once min_tokens are out.
"""

from __future__ import annotations

import logging
import time

from tpserve.engine.detokenizer import IncrementalDetokenizer
from tpserve.engine.grammar import CompiledGrammar
from tpserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tpserve.engine.protocol import Sample
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.sequence import FinishReason, Logprob, Sequence
from tpserve.engine.stop_strings import StopStringMatcher


logger = logging.getLogger(__name__)


def to_logprob(sample: Sample) -> Logprob:
    return Logprob(sample.token_id, sample.logprob, dict(sample.top))


class Request:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seed: int,
        tokenizer,
        eos_token_ids: set[int],
        max_model_len: int,
        grammar: CompiledGrammar | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        leader = Sequence(request_id, prompt_token_ids, params, seed, 0, self.metrics.arrival_time)
        # Samples 1..n-1 fork from sample 0 once it has computed the prompt (the scheduler makes
        # them then); `seqs[i]` is sample i once it exists.
        leader.num_pending_forks = params.n - 1
        self.seqs = [leader]
        self.detokenizers = [
            IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens) for _ in range(params.n)
        ]
        self.stop_matchers = [
            StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
            for _ in range(params.n)
        ]
        self.matchers = [grammar.matcher() for _ in range(params.n)] if grammar is not None else None
        # Samples finished (`finish` is called once for each); read every step, so counted, not scanned.
        self.num_finished = 0
        self.prompt_logprobs: list[Logprob | None] | None = (
            [None] * len(prompt_token_ids) if params.prompt_logprobs is not None else None
        )
        self.prompt_logprobs_sent = False

    def matcher(self, sample_index: int):
        """Sample `sample_index`'s grammar matcher; None for an unconstrained request."""
        return self.matchers[sample_index] if self.matchers is not None else None

    @property
    def finished(self) -> bool:
        return self.num_finished == self.params.n

    def add_prompt_logprobs(self, entries: list[tuple[int, Sample]]) -> None:
        for position, sample in entries:
            self.prompt_logprobs[position] = to_logprob(sample)

    def on_token(self, seq: Sequence, sample: Sample) -> CompletionOutput:
        """The delta of `seq`, whose token `sample` the scheduler has just appended: its text,
        and the reason it must stop, if it must (then `finish` has been called)."""
        if self.metrics.first_token_time is None:
            self.metrics.first_token_time = time.monotonic()
        params = self.params
        i = seq.sample_index
        if i == len(self.seqs):  # a fork's first token
            self.seqs.append(seq)
        delta = self.detokenizers[i].append([sample.token_id])
        reason = None
        if sample.token_id in self.eos_token_ids and not params.ignore_eos:
            reason = FinishReason.STOP
        elif params.stop_token_ids and sample.token_id in params.stop_token_ids:
            reason, seq.stop_reason = FinishReason.STOP, sample.token_id
        if self.matchers is not None:
            matcher = self.matchers[i]
            if not matcher.consume_token(sample.token_id):  # the mask allowed it: a bug, not the model's doing
                logger.error("request %r: token %d broke its grammar: %s", self.request_id, sample.token_id,
                             matcher.get_error())
                reason = FinishReason.ABORT
            elif reason is None and matcher.is_stopped():
                reason = FinishReason.STOP
        at_length = (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) or (
            seq.num_tokens >= self.max_model_len
        )
        if reason is not None or at_length:
            delta += self.detokenizers[i].flush()  # bytes of an unfinished character, as decode shows them
        matcher, matched = self.stop_matchers[i], None
        text = delta
        if matcher is not None and seq.num_output_tokens >= params.min_tokens:
            text, matched = matcher.feed(delta)
            if matched is not None and reason is None:
                reason, seq.stop_reason = FinishReason.STOP, matched
        if reason is None and at_length:
            reason = FinishReason.LENGTH
        if reason is not None and matcher is not None and matched is None:
            text += matcher.flush()  # no stop string ended it: release what was held back
        if reason is not None:
            self.finish(seq, reason)
        if params.logprobs is None:  # positional arguments: this runs for every token
            return CompletionOutput(i, text, [sample.token_id], None, None, reason and reason.value,
                                    seq.stop_reason if reason else None)
        return CompletionOutput(i, text, [sample.token_id], seq.cumulative_logprob, [to_logprob(sample)],
                                reason and reason.value, seq.stop_reason if reason else None)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        self._count_finished()

    def _count_finished(self) -> None:
        self.num_finished += 1
        if self.finished:
            self.metrics.finished_time = time.monotonic()

    def abort(self) -> tuple[list[Sequence], list[CompletionOutput]]:
        """Stop every sample still running: the sequences to remove from the scheduler, and the
        last delta of each sample (of samples not forked yet too), with finish_reason "abort"."""
        stopped, deltas = [], []
        for i in range(self.params.n):
            seq = self.seqs[i] if i < len(self.seqs) else None
            if seq is not None:
                if seq.finish_reason is not None:
                    continue
                self.finish(seq, FinishReason.ABORT)
                stopped.append(seq)
            else:
                self._count_finished()
            deltas.append(CompletionOutput(
                index=i, text="", token_ids=[],
                cumulative_logprob=(seq.cumulative_logprob if seq is not None else 0.0)
                if self.params.logprobs is not None else None,
                logprobs=[] if self.params.logprobs is not None else None,
                finish_reason=FinishReason.ABORT.value,
            ))
        return stopped, deltas

    def output(self, deltas: list[CompletionOutput]) -> RequestOutput:
        """The request's delta for one step: the samples that moved. Its first delta with a
        sampled token (or its last) carries the prompt logprobs, complete by then."""
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent:
            prompt_logprobs = list(self.prompt_logprobs)
            self.prompt_logprobs_sent = True
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, prompt_logprobs, deltas,
                             self.finished, self.seqs[0].num_cached_tokens, self.metrics)
