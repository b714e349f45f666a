"""`Scheduler`: which sequences run in the next step, and how many tokens each.

One token budget per step, no prefill and decode phases:

    budget = max_num_batched_tokens
    1. running sequences that decode: 1 token each
    2. running sequences still in their prompt: the next chunk (chunked prefill)
    3. waiting sequences, oldest first: admitted while the budget, max_num_seqs and free
       blocks allow; the last one admitted may get only a chunk of its prompt

When a running sequence needs a block and none is free, the newest running sequence not yet
scheduled this step is preempted by recompute: its blocks are freed (its full blocks stay in
the prefix cache), and it goes back to the front of the waiting queue, so FCFS order holds.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from tpserve.engine.block_manager import BlockManager
from tpserve.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Sequences the workers must forget before the next step (finished, aborted, preempted).
        self.dropped_seq_ids: list[int] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A forked sample: it holds blocks already and joins the running batch directly."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        done: set[int] = set()
        preempted = False

        # 1 and 2: running sequences, decodes before prompt chunks, each group oldest first.
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        chunking = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decoding + chunking:
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new == 0:
                break
            while not self.block_manager.can_append(seq, num_new):
                victim = self._newest_unscheduled(done)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.block_manager.append_slots(seq, num_new)
            scheduled.append(ScheduledSequence(seq, num_new))
            done.add(seq.seq_id)
            budget -= num_new

        # 3: admit waiting sequences. Not in a step that preempted: the cache is full.
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            # A request's other samples fork from it and join the batch when its prompt is done.
            if len(self.running) + 1 + seq.num_pending_forks > self.max_num_seqs:
                break
            num_new = min(seq.num_tokens - self.block_manager.num_cached_tokens(seq), budget)
            if not self.block_manager.can_allocate(seq, num_new):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            self.block_manager.append_slots(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new

        self._check(scheduled)
        return scheduled

    def _newest_unscheduled(self, done: set[int]) -> Sequence:
        for seq in reversed(self.running):
            if seq.seq_id not in done:
                return seq
        raise AssertionError("the sequence being scheduled is always a candidate")

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.needs_full_send = True
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.dropped_seq_ids.append(seq.seq_id)
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
        """Remove a finished or aborted sequence and return its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.block_manager.free(seq)
        if not seq.needs_full_send:  # the workers know it
            self.dropped_seq_ids.append(seq.seq_id)
        seq.status = SequenceStatus.FINISHED

    def _check(self, scheduled: list[ScheduledSequence]) -> None:
        """Cheap invariants: the budget, the batch size, and blocks for every scheduled token."""
        assert sum(s.num_new_tokens for s in scheduled) <= self.max_num_batched_tokens
        assert len(self.running) <= self.max_num_seqs
        bs = self.block_manager.block_size
        for s in scheduled:
            assert s.num_new_tokens > 0
            assert len(s.seq.block_table) * bs >= s.seq.num_computed_tokens + s.num_new_tokens, s.seq
