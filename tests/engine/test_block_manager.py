"""BlockManager: exact block ids and reference counts (block_size 4 throughout)."""

from __future__ import annotations

import pytest

from tpserve.engine import block_manager as bm_module
from tpserve.engine.block_manager import BlockManager
from tpserve.engine.sequence import Sequence


def seq(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, params=None, seed=0)


def run(bm: BlockManager, s: Sequence) -> Sequence:
    """Admit s and compute all its tokens, as a step would."""
    if s.block_table:
        num_new = s.num_uncomputed_tokens
        assert bm.allocate_slots(s, num_new) == []
    else:
        num_new = bm.allocate(s, token_budget=1000)
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
    assert bm.allocate(b, token_budget=1000) == 3  # only the 3 tokens after the cached blocks
    assert b.block_table == [0, 1, 2, 4] and b.num_computed_tokens == 12 and b.num_cached_tokens == 12
    assert refs(bm, [0, 1, 2, 3, 4]) == [2, 2, 2, 1, 1]
    assert bm.num_prefix_hits == 3


def test_partial_block_is_never_shared():
    bm = BlockManager(num_blocks=8, block_size=4)
    run(bm, seq(list(range(14))))  # block 3 holds tokens 12, 13 only
    c = seq(list(range(14)) + [50, 51])
    bm.allocate(c, token_budget=1000)
    assert c.block_table[:3] == [0, 1, 2] and c.num_computed_tokens == 12
    assert c.block_table[3] != 3  # not block 3, although its two tokens match
    assert bm.blocks[3].hash is None


def test_last_token_is_always_computed():
    """A prompt made only of cached full blocks still runs its last block's tokens."""
    bm = BlockManager(num_blocks=8, block_size=4)
    run(bm, seq(list(range(8))))
    again = seq(list(range(8)))
    assert bm.allocate(again, token_budget=1000) == 4
    assert again.block_table[0] == 0 and again.num_computed_tokens == 4


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
    bm.free(d)  # room for e's own new block; d's blocks go behind 1 and 0 in the free list
    e = seq(list(range(8)) + [7, 7, 7])
    bm.allocate(e, token_budget=1000)
    assert e.block_table[:2] == [0, 1] and e.num_computed_tokens == 8  # 0 and 1, freed last, were still cached


def test_hash_collision_is_caught_by_the_token_check(monkeypatch):
    monkeypatch.setattr(bm_module, "block_hash", lambda prefix, tokens: 42)  # everything collides
    bm = BlockManager(num_blocks=8, block_size=4)
    run(bm, seq([1, 2, 3, 4, 5]))
    other = seq([9, 9, 9, 9, 9])
    bm.allocate(other, token_budget=1000)
    assert 0 not in other.block_table and other.num_computed_tokens == 0
    same = seq([1, 2, 3, 4, 6])
    bm.allocate(same, token_budget=1000)
    assert same.block_table[0] == 0 and same.num_computed_tokens == 4


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
    assert [bm.allocate_slots(s, 1) for s in children] == [[(1, 2)], [(1, 3)]]
    assert [c.block_table for c in children] == [[0, 2], [0, 3]]
    free = bm.num_free_blocks
    assert bm.allocate_slots(parent, 1) == []
    assert parent.block_table == [0, 1] and bm.num_free_blocks == free
    assert refs(bm, [0, 1, 2, 3]) == [3, 1, 1, 1]


def test_allocation_that_does_not_fit_takes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = run(bm, seq(list(range(10))))  # blocks 0 1 2
    assert bm.allocate(seq(list(range(100, 109))), token_budget=1000) is None  # 3 blocks, 1 free
    assert bm.num_free_blocks == 1
    assert bm.allocate_slots(a, 7) is None  # 17 tokens need 2 more blocks
    assert a.block_table == [0, 1, 2] and bm.num_free_blocks == 1
    assert bm.allocate_slots(a, 6) == [] and a.block_table == [0, 1, 2, 3]


def test_everything_comes_back():
    bm = BlockManager(num_blocks=16, block_size=4)
    seqs = [run(bm, seq(list(range(n)))) for n in (3, 9, 14)]
    for s in seqs:
        bm.free(s)
    assert bm.num_free_blocks == 16 and all(b.ref_count == 0 for b in bm.blocks)
    with pytest.raises(AssertionError, match="released more often"):
        bm._release(0)
