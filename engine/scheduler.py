"""`Scheduler`: which sequences run in the next step, how many tokens each, and the step protocol.

One token budget per step, no prefill and decode phases:

    budget = max_num_batched_tokens
    1. running sequences that decode: 1 token each
    2. running sequences still in their prompt: the next chunk (chunked prefill)
    3. waiting sequences, oldest first: admitted while the budget, max_num_seqs and free
       blocks allow; the last one admitted may get only a chunk of its prompt

When a running sequence needs a block and none is free, the newest running sequence not yet
scheduled this step (and in no batch in flight) is preempted by recompute: its blocks are freed
(its full blocks stay in the prefix cache), and it goes back to the front of the waiting queue,
so FCFS order holds.

The scheduler alone owns the step protocol, as vLLM v1's does: `schedule()` returns a
`SchedulerOutput` whose `StepPlan` says everything the workers must learn (new sequences in full,
running ones as deltas, sequences to forget, block copies), and only the scheduler remembers what
the workers know. `update_from_output()` takes the batch's result back: it advances what each
sequence has computed, names its full blocks in the prefix cache, appends the sampled tokens and
forks a request's other samples. The engine checks stop conditions on those tokens and calls
`finish()` for the sequences that must stop.

Several batches may be in flight (pipeline parallelism keeps one per stage): a sequence is never
scheduled into a batch while an earlier batch holding it has not returned, is never preempted
then, and the blocks of a sequence finished or aborted meanwhile are freed only when that batch
returns, so no block is reused while a batch may still write it.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from tpserve.engine.block_manager import BlockManager
from tpserve.engine.protocol import NewSequence, Sample, StepPlan, StepResult
from tpserve.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    # Tokens to sample from its last row: 0 in the middle of a prompt, 1, or 1 + its pending
    # forks when the step ends its prompt (the request's other samples fork from that row).
    num_samples: int


@dataclass
class SchedulerOutput:
    """One scheduled batch: the plan for the workers and, for `update_from_output`, its sequences."""

    plan: StepPlan
    scheduled: list[ScheduledSequence]


@dataclass
class _WorkerView:
    """What the workers hold of a sequence: its tokens up to `num_tokens`, and its block table
    up to `num_blocks`, ending in `last_block` (a copy on write may replace it since)."""

    num_tokens: int
    num_blocks: int
    last_block: int


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # The step protocol's memory: what the workers know of each sequence, and the
        # sequences they must forget (finished, aborted, preempted) in the next plan.
        self._worker_views: dict[int, _WorkerView] = {}
        self._dropped_seq_ids: list[int] = []
        # Sequences in a batch that has not returned yet, and those of them finished meanwhile.
        self._in_flight: set[int] = set()
        self._finished_in_flight: set[int] = set()

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    # --- scheduling ---
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        copies: list[tuple[int, int]] = []
        done: set[int] = set()
        preempted = False

        # 1 and 2: running sequences, decodes before prompt chunks, each group oldest first.
        in_flight = self._in_flight
        ready = [s for s in self.running if s.seq_id not in in_flight] if in_flight else self.running
        decoding, chunking = [], []
        for seq in ready:
            (decoding if seq.num_uncomputed_tokens == 1 else chunking).append(seq)
        for seq in decoding + chunking:
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new == 0:
                break
            while (new_copies := self.block_manager.allocate_slots(seq, num_new)) is None:
                victim = self._newest_preemptible(done)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            copies += new_copies
            scheduled.append(ScheduledSequence(seq, num_new, self._num_samples(seq, num_new)))
            done.add(seq.seq_id)
            budget -= num_new

        # 3: admit waiting sequences. Not in a step that preempted: the cache is full.
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            # A request's other samples fork from it and join the batch when its prompt is done.
            if len(self.running) + 1 + seq.num_pending_forks > self.max_num_seqs:
                break
            num_new = self.block_manager.allocate(seq, budget)
            if num_new is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_new, self._num_samples(seq, num_new)))
            budget -= num_new

        self._check(scheduled)
        if not scheduled:  # no step runs: what the workers must forget waits for the next plan
            return SchedulerOutput(StepPlan(), [])
        plan = self._plan(scheduled, copies)
        self._in_flight.update(s.seq.seq_id for s in scheduled)
        return SchedulerOutput(plan, scheduled)

    @staticmethod
    def _num_samples(seq: Sequence, num_new: int) -> int:
        reaches_end = seq.num_computed_tokens + num_new == seq.num_tokens
        return 1 + seq.num_pending_forks if reaches_end else 0

    def _plan(self, scheduled: list[ScheduledSequence], copies: list[tuple[int, int]]) -> StepPlan:
        """The workers' plan: a sequence they do not know in full, one they know as what changed
        since they last heard of it (its new tokens, the new tail of its block table)."""
        plan = StepPlan(dropped_seq_ids=self._dropped_seq_ids, block_copies=copies)
        self._dropped_seq_ids = []
        for item in scheduled:
            seq = item.seq
            table = seq.block_table
            view = self._worker_views.get(seq.seq_id)
            if view is None:
                plan.new_sequences.append(
                    NewSequence(seq.seq_id, list(seq.token_ids), seq.num_prompt_tokens, list(table),
                                seq.params, seq.seed, seq.sample_index)
                )
                self._worker_views[seq.seq_id] = _WorkerView(seq.num_tokens, len(table), table[-1])
                appended, start = [], len(table)
            else:
                appended = seq.tokens(view.num_tokens, seq.num_tokens)
                # Only the last block sent can have changed (a copy on write replaces it).
                start = view.num_blocks
                if start and table[start - 1] != view.last_block:
                    start -= 1
                view.num_tokens, view.num_blocks, view.last_block = seq.num_tokens, len(table), table[-1]
            plan.seq_ids.append(seq.seq_id)
            plan.num_computed_tokens.append(seq.num_computed_tokens)
            plan.num_scheduled_tokens.append(item.num_new_tokens)
            plan.num_samples.append(item.num_samples)
            plan.appended_tokens.append(appended)
            plan.block_starts.append(start)
            plan.block_tails.append(table[start:])
        return plan

    # --- results ---
    def update_from_output(self, output: SchedulerOutput, result: StepResult) -> list[tuple[Sequence, Sample]]:
        """Take back a batch: every sequence computed its scheduled tokens; those that sampled
        get their token appended, and a prompt that sampled n forks the request's other samples
        (sharing its blocks). The new tokens, one (sequence, sample) each, a request's first
        sample before its forks. A sequence finished while the batch ran gets its blocks back now."""
        new_tokens: list[tuple[Sequence, Sample]] = []
        for item in output.scheduled:
            seq = item.seq
            self._in_flight.discard(seq.seq_id)
            if seq.seq_id in self._finished_in_flight:
                self._finished_in_flight.discard(seq.seq_id)
                self._release(seq)
                continue
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            samples = result.samples.get(seq.seq_id)
            if not samples:
                continue
            if len(samples) == 1:
                self._append(seq, samples[0])
                new_tokens.append((seq, samples[0]))
            else:
                new_tokens += self._fork(seq, samples)
        return new_tokens

    def _fork(self, seq: Sequence, samples: list[Sample]) -> list[tuple[Sequence, Sample]]:
        """seq's prompt is computed and sampled n times: samples 1..n-1 of its request begin
        here, sharing its blocks (taken before seq's own token is appended)."""
        new_tokens = [(seq, samples[0])]
        for index, sample in enumerate(samples[1:], start=1):
            child = seq.fork(index)
            self.block_manager.fork(seq, child)
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
            self._append(child, sample)
            new_tokens.append((child, sample))
        seq.num_pending_forks = 0
        self._append(seq, samples[0])
        return new_tokens

    @staticmethod
    def _append(seq: Sequence, sample: Sample) -> None:
        seq.append_token(sample.token_id, sample.logprob if seq.params.logprobs is not None else None)

    # --- leaving the batch ---
    def _newest_preemptible(self, done: set[int]) -> Sequence:
        for seq in reversed(self.running):
            if seq.seq_id not in done and seq.seq_id not in self._in_flight:
                return seq
        raise AssertionError("the sequence being scheduled is always a candidate")

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        # The front of the queue, but behind any older preempted sequence already there.
        position = 0
        while position < len(self.waiting) and self.waiting[position].arrival_time <= seq.arrival_time:
            position += 1
        self.waiting.insert(position, seq)
        logger.warning(
            "preempted sequence %d of request %r (recompute): KV cache full; %d preemptions so far",
            seq.seq_id, seq.request_id, self.num_preemptions,
        )

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence; its blocks come back now, or when the batch
        holding it returns."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        if seq.seq_id in self._in_flight:
            self._finished_in_flight.add(seq.seq_id)
        else:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Free seq's blocks, and have the workers forget it if they know it."""
        if seq.block_table:
            self.block_manager.free(seq)
        if self._worker_views.pop(seq.seq_id, None) is not None:
            self._dropped_seq_ids.append(seq.seq_id)

    def _check(self, scheduled: list[ScheduledSequence]) -> None:
        """Cheap invariants: the budget, the batch size, blocks for every scheduled token, and
        no sequence in two batches at once."""
        assert sum(s.num_new_tokens for s in scheduled) <= self.max_num_batched_tokens
        assert len(self.running) <= self.max_num_seqs
        bs = self.block_manager.block_size
        for s in scheduled:
            assert s.num_new_tokens > 0
            assert s.seq.seq_id not in self._in_flight, s.seq
            assert len(s.seq.block_table) * bs >= s.seq.num_computed_tokens + s.num_new_tokens, s.seq
