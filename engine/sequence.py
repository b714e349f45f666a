"""`Sequence`: one stream of tokens being generated, and everything the engine knows about it.

A request with n > 1 samples owns n sequences that share the prompt. Sequences live in the
engine process only; workers get what they need through the step plan, which the scheduler
alone builds (it, not the sequence, remembers what the workers know).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tpserve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not in the cache (new, or preempted)
    RUNNING = "running"  # has blocks; scheduled every step until it finishes
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's length
    ABORT = "abort"  # cancelled by the client, or failed


@dataclass(slots=True)
class Logprob:
    """The log-probability of a token and the most likely alternatives at its position."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


_seq_ids = itertools.count()


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seed: int,
        sample_index: int = 0,
        arrival_time: float = 0.0,
    ) -> None:
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.params = params
        self.seed = seed
        self.sample_index = sample_index
        self.arrival_time = arrival_time
        self._token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.block_table: list[int] = []
        # Tokens whose K/V are in the cache: everything before them needs no recomputation.
        self.num_computed_tokens = 0
        # Prompt tokens found in the prefix cache at admission (for usage statistics).
        self.num_cached_tokens = 0
        self.cumulative_logprob = 0.0
        # Samples of this request (sample_index 1, 2, ...) that the scheduler forks from this
        # sequence once its prompt is computed; they do not exist before.
        self.num_pending_forks = 0

    # --- token views ---
    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(self._token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self._token_ids[self.num_prompt_tokens :]

    def tokens(self, start: int, stop: int) -> list[int]:
        return self._token_ids[start:stop]

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model before this sequence can sample."""
        return len(self._token_ids) - self.num_computed_tokens

    def append_token(self, token_id: int, logprob: float | None) -> None:
        self._token_ids.append(token_id)
        if logprob is not None:
            self.cumulative_logprob += logprob

    def fork(self, sample_index: int) -> Sequence:
        """Sample `sample_index` of the same request: the prompt and nothing generated yet."""
        return Sequence(self.request_id, self.prompt_token_ids, self.params, self.seed, sample_index, self.arrival_time)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, {self.status.value}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={self.block_table})"
        )
