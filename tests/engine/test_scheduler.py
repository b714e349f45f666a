"""Scheduler without a model or workers: hand-built sequences over a small real `BlockManager`
(block_size 4), exact plans asserted, results handed back as a worker would."""

from __future__ import annotations

from tpserve.engine.block_manager import BlockManager
from tpserve.engine.protocol import Sample, StepPlan, StepResult
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.scheduler import Scheduler, SchedulerOutput
from tpserve.engine.sequence import Sequence, SequenceStatus


def make(num_blocks: int, budget: int = 64, max_num_seqs: int = 8) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size=4), max_num_seqs, budget)


def seq(tokens: list[int], arrival: float, n: int = 1) -> Sequence:
    s = Sequence(f"r{arrival}", tokens, SamplingParams(n=n), seed=0, arrival_time=arrival)
    s.num_pending_forks = n - 1
    return s


def give_back(sched: Scheduler, out: SchedulerOutput, token: int = 7) -> list[tuple[Sequence, Sample]]:
    """The workers' answer: `token` for every sample the plan asked for."""
    result = StepResult(samples={i: [Sample(token, None, []) for _ in range(n)]
                                 for i, n in zip(out.plan.seq_ids, out.plan.num_samples) if n})
    return sched.update_from_output(out, result)


def rows(plan: StepPlan) -> list[tuple]:
    """(seq id, first position, tokens, samples) per scheduled sequence."""
    return list(zip(plan.seq_ids, plan.num_computed_tokens, plan.num_scheduled_tokens, plan.num_samples))


def test_decodes_first_then_prompt_chunks_within_the_budget():
    sched = make(num_blocks=16, budget=8)
    a, b = seq(list(range(6)), 0), seq(list(range(10, 20)), 1)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert rows(out.plan) == [(a.seq_id, 0, 6, 1), (b.seq_id, 0, 2, 0)]  # b gets the budget's rest
    assert [s.block_table for s in out.plan.new_sequences] == [[0, 1], [2]]
    assert [s for s, _ in give_back(sched, out, token=50)] == [a]  # b is mid-prompt: no token
    assert a.output_token_ids == [50] and b.num_computed_tokens == 2

    out = sched.schedule()  # a's decode first, then b's next chunk: 7 of its 8 uncomputed tokens
    assert rows(out.plan) == [(a.seq_id, 6, 1, 1), (b.seq_id, 2, 7, 0)]
    assert out.plan.new_sequences == []
    assert out.plan.appended_tokens == [[50], []]  # a's sampled token; the workers have b's prompt
    assert out.plan.block_starts == [2, 1] and out.plan.block_tails == [[], [3, 4]]
    give_back(sched, out, token=51)

    out = sched.schedule()
    assert rows(out.plan) == [(a.seq_id, 7, 1, 1), (b.seq_id, 9, 1, 1)]  # b's last prompt token samples
    assert out.plan.appended_tokens == [[51], []] and out.plan.block_tails == [[], []]


def test_prefix_hit_starts_after_the_cached_blocks():
    sched = make(num_blocks=16)
    a = seq(list(range(9)), 0)
    sched.add(a)
    give_back(sched, sched.schedule())
    sched.finish(a)
    b = seq(list(range(8)) + [90, 91], 1)
    sched.add(b)
    out = sched.schedule()
    assert rows(out.plan) == [(b.seq_id, 8, 2, 1)]  # 2 cached blocks: 8 tokens not recomputed
    assert out.plan.new_sequences[0].block_table[:2] == [0, 1]
    assert out.plan.dropped_seq_ids == [a.seq_id]
    assert sched.block_manager.num_prefix_hits == 2


def test_preemption_takes_the_newest_and_keeps_arrival_order():
    sched = make(num_blocks=3)
    seqs = [seq([i] * 4, i) for i in range(3)]  # one block each: the cache is full
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    assert len(first.scheduled) == 3
    give_back(sched, first)
    # Each now needs a second block for its 5th token. The newest (2) goes first; 1 then has
    # none left either and is preempted by itself.
    out = sched.schedule()
    assert rows(out.plan) == [(seqs[0].seq_id, 4, 1, 1)]
    assert out.plan.dropped_seq_ids == [seqs[2].seq_id, seqs[1].seq_id]
    assert list(sched.waiting) == [seqs[1], seqs[2]] and sched.num_preemptions == 2
    assert seqs[1].status == SequenceStatus.WAITING and seqs[1].block_table == []
    give_back(sched, out)
    sched.finish(seqs[0])
    # 1 comes back first, sent in full again with the token it had made, its full block found
    # in the prefix cache; 2's block was reused by 0, and one free block is too few for it.
    out = sched.schedule()
    assert [s.seq_id for s in out.plan.new_sequences] == [seqs[1].seq_id]
    assert out.plan.new_sequences[0].token_ids == [1, 1, 1, 1, 7]
    assert rows(out.plan) == [(seqs[1].seq_id, 4, 1, 1)]
    assert out.plan.dropped_seq_ids == [seqs[0].seq_id]
    assert list(sched.waiting) == [seqs[2]]


def test_a_fork_shares_the_prompt_and_copies_the_partial_block():
    sched = make(num_blocks=8)
    a = seq([3] * 6, 0, n=3)
    sched.add(a)
    out = sched.schedule()
    assert rows(out.plan) == [(a.seq_id, 0, 6, 3)]  # the prompt's last row gives all 3 samples
    new = give_back(sched, out)
    assert [s.sample_index for s, _ in new] == [0, 1, 2]
    children = [s for s, _ in new[1:]]
    assert all(c.block_table == [0, 1] and c.output_token_ids == [7] for c in children)
    out = sched.schedule()
    # Everyone writes token 7 into the shared partial block 1: the first two copy it, the last
    # one left holding it writes in place.
    assert out.plan.block_copies == [(1, 2), (1, 3)]
    assert [s.seq_id for s in out.plan.new_sequences] == [c.seq_id for c in children]
    assert [s.block_table for s in out.plan.new_sequences] == [[0, 3], [0, 1]]
    assert out.plan.block_starts[0] == 1 and out.plan.block_tails[0] == [2]  # a's last block replaced
    assert [sched.block_manager.blocks[i].ref_count for i in range(4)] == [3, 1, 1, 1]


def test_two_batches_in_flight_with_an_abort_and_a_preemption():
    """Pipeline parallelism keeps several batches in flight. A sequence waits for its token from
    one batch before it joins another; one finished or aborted while its batch runs keeps its
    blocks until that batch returns; one in flight is never preempted."""
    sched = make(num_blocks=4)
    a, b, c, d = (seq([i] * 4, i) for i in range(4))  # one block each
    for s in (a, b, c):
        sched.add(s)
    batch1 = sched.schedule()
    assert [s.seq for s in batch1.scheduled] == [a, b, c]
    sched.add(d)
    batch2 = sched.schedule()  # a, b, c are in flight: only d, newly admitted, runs
    assert [s.seq for s in batch2.scheduled] == [d]
    assert sched.block_manager.num_free_blocks == 0

    sched.finish(b)  # aborted while batch 1 runs: the workers may still write its block
    assert b.block_table == [1] and sched.block_manager.blocks[1].ref_count == 1
    assert sched.schedule().scheduled == []  # nothing is free to schedule
    new = give_back(sched, batch1)
    assert [s for s, _ in new] == [a, c]  # b's token is dropped
    assert b.block_table == [] and sched.block_manager.num_free_blocks == 1

    # Batch 3, with d still in flight: a and c each need a second block, one is free. c is out
    # of blocks; the newest running sequence, d, is in flight and is spared; c preempts itself.
    batch3 = sched.schedule()
    assert rows(batch3.plan) == [(a.seq_id, 4, 1, 1)]
    assert batch3.plan.dropped_seq_ids == [b.seq_id, c.seq_id]
    assert d.status == SequenceStatus.RUNNING and d.block_table == [3]
    assert list(sched.waiting) == [c]
    # Both batches in flight hold every running sequence: the next batch has nothing to run,
    # and c cannot come back (its cached block is the only free one, and it needs another).
    assert sched.schedule().scheduled == []

    assert [s for s, _ in give_back(sched, batch2)] == [d]
    sched.finish(a)  # a's stop condition, decided while batch 3 still runs
    assert a.block_table != []
    assert give_back(sched, batch3) == []  # a finished: its token is not taken
    assert a.block_table == []
    sched.finish(d)
    sched.finish(c)
    assert sched.block_manager.num_free_blocks == 4 and not sched.running and not sched.waiting
    e = seq([9] * 4, 4)
    sched.add(e)
    assert sched.schedule().plan.dropped_seq_ids == [a.seq_id, d.seq_id]  # c was not known to them
