"""BlockManager: exact block ids and reference counts (block_size 4 throughout)."""

from __future__ import annotations

import pytest

from tpserve.engine import block_manager as bm_module
from tpserve.engine.block_manager import BlockManager
from tpserve.engine.sequence import Sequence


def seq(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, params=None, seed=0)


def run(bm: BlockManager, s: Sequence, num_new: int | None = None) -> Sequence:
    """Admit s and compute `num_new` of its tokens (all by default), as a step would."""
    if not s.block_table:
        bm.allocate(s)
    num_new = s.num_uncomputed_tokens if num_new is None else num_new
    bm.append_slots(s, num_new)
    s.num_computed_tokens += num_new
    bm.cache_full_blocks(s)
    return s


def refs(bm: BlockManager, ids) -> list[int]:
    return [bm.blocks[i].ref_count for i in ids]


def test_prefix_hit_on_shared_full_blocks_with_different_suffixes():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = run(bm, seq(list(range(14))))
    assert a.block_table == [0, 1, 2, 3]
    b = seq(list(range(12)) + [99, 98, 97])
    bm.allocate(b)
    assert b.block_table == [0, 1, 2] and b.num_computed_tokens == 12 and b.num_cached_tokens == 12
    run(bm, b)
    assert b.block_table == [0, 1, 2, 4]
    assert refs(bm, [0, 1, 2, 3, 4]) == [2, 2, 2, 1, 1]
    assert bm.num_prefix_hits == 3


def test_partial_block_is_never_shared():
    bm = BlockManager(num_blocks=8, block_size=4)
    run(bm, seq(list(range(14))))  # block 3 holds tokens 12, 13 only
    c = seq(list(range(14)) + [50, 51])
    bm.allocate(c)
    assert c.block_table == [0, 1, 2]  # not block 3, although its two tokens match
    assert bm.blocks[3].hash is None


def test_last_token_is_always_computed():
    """A prompt made only of cached full blocks still runs its last block's tokens."""
    bm = BlockManager(num_blocks=8, block_size=4)
    run(bm, seq(list(range(8))))
    again = seq(list(range(8)))
    bm.allocate(again)
    assert again.block_table == [0] and again.num_computed_tokens == 4


def test_cached_blocks_survive_their_sequence_and_are_evicted_lru():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = run(bm, seq(list(range(14))))  # blocks 0 1 2 3
    b = run(bm, seq(list(range(12)) + [99, 98, 97]))  # blocks 0 1 2 4
    bm.free(b)
    bm.free(a)
    assert bm.num_free_blocks == 8
    # Freed last block first, so the free list (oldest first) is: never used, then 4 3 2 1 0.
    assert list(bm.free_block_ids) == [5, 6, 7, 4, 3, 2, 1, 0]
    assert {bm.blocks[i].hash is not None for i in (0, 1, 2)} == {True}
    d = run(bm, seq([500 + i for i in range(24)]))  # needs 6 blocks: takes 5 6 7 4 3 2
    assert d.block_table == [5, 6, 7, 4, 3, 2]
    assert bm.blocks[2].token_ids == tuple(range(500 + 20, 500 + 24))  # 2 was evicted and reused
    e = seq(list(range(8)) + [7, 7, 7])
    bm.allocate(e)
    assert e.block_table == [0, 1]  # 0 and 1, freed last, were still cached


def test_hash_collision_is_caught_by_the_token_check(monkeypatch):
    monkeypatch.setattr(bm_module, "block_hash", lambda prefix, tokens: 42)  # everything collides
    bm = BlockManager(num_blocks=8, block_size=4)
    run(bm, seq([1, 2, 3, 4, 5]))
    other = seq([9, 9, 9, 9, 9])
    bm.allocate(other)
    assert other.block_table == [] and other.num_computed_tokens == 0
    same = seq([1, 2, 3, 4, 6])
    bm.allocate(same)
    assert same.block_table == [0]


def test_fork_shares_prompt_blocks_and_copies_the_partial_block_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = run(bm, seq([1, 2, 3, 4, 5, 6]))  # blocks 0 (full) and 1 (2 of 4 tokens)
    children = [parent.fork(i) for i in (1, 2)]
    for child in children:
        bm.fork(parent, child)
    assert refs(bm, [0, 1]) == [3, 3]  # held by n = 3 samples
    for i, s in enumerate([parent, *children]):
        s.append_token(100 + i, None)
    # Each writes its first sampled token into block 1: the first two writers copy it, the
    # last one left holding it writes in place.
    for s in children:
        assert bm.num_new_blocks(s, 1) == 1
        bm.append_slots(s, 1)
    assert [c.block_table for c in children] == [[0, 2], [0, 3]]
    assert bm.pending_copies == [(1, 2), (1, 3)]
    assert bm.num_new_blocks(parent, 1) == 0
    bm.append_slots(parent, 1)
    assert parent.block_table == [0, 1]
    assert refs(bm, [0, 1, 2, 3]) == [3, 1, 1, 1]


def test_everything_comes_back():
    bm = BlockManager(num_blocks=16, block_size=4)
    seqs = [run(bm, seq(list(range(n)))) for n in (3, 9, 14)]
    for s in seqs:
        bm.free(s)
    assert bm.num_free_blocks == 16 and all(b.ref_count == 0 for b in bm.blocks)
    with pytest.raises(AssertionError, match="released more often"):
        bm._release(0)
