"""`BlockManager`: the paged KV cache's blocks, their reference counts, and the prefix cache.

Plain Python, no tensors: block ids here are the indices the workers use in their caches.

Prefix caching: a full block is named by a hash chained over every token up to its end,

    h_0 = hash((None, tokens[0:B]))     h_1 = hash((h_0, tokens[B:2B]))    ...

so equal hashes mean equal prefixes (the tokens are compared too, so a collision is caught).
A full block keeps its hash after its last user frees it: it sits in the free list, oldest
first, and a new sequence with the same prefix takes it back. A block taken from the free
list for new tokens loses its old hash then: the least recently freed cached block goes first.
Partial blocks are never shared through the cache (their tokens are still being written).

Copy on write: the n samples of one request share the prompt's blocks, the partial last one
included. A sequence about to write into a shared partial block gets its own copy first; the
scheduler tells the workers to copy the block's K/V before the step runs.

Allocation is try-and-take, as vLLM's `allocate_slots`: one call checks and takes, and returns
None (changing nothing) when too few blocks are free, so a check and a take never disagree.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from tpserve.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its tokens are known
    token_ids: tuple[int, ...] = ()


def block_hash(prefix_hash: int | None, token_ids: tuple[int, ...]) -> int:
    # Python's hash of a tuple of ints is deterministic (no per-process salt, unlike str).
    return hash((prefix_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks no sequence holds, least recently freed first (the eviction order).
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.num_prefix_hits = 0  # blocks found in the prefix cache, over the engine's life

    # --- accounting ---
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- taking and returning blocks ---
    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)  # least recently freed
        block = self.blocks[block_id]
        if block.hash is not None:  # evict it from the prefix cache
            if self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def _hold(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} released more often than held"
        if block.ref_count == 0:
            self.free_block_ids[block_id] = None  # most recently freed: evicted last

    # --- prefix cache ---
    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the cache that hold seq's leading full blocks, in order.

        The last token is never taken from the cache: the model must run on at least one token
        to give the logits the next token is sampled from.
        """
        if not self.enable_prefix_caching:
            return []
        found, prefix_hash = [], None
        for start in range(0, seq.num_tokens - 1 - self.block_size + 1, self.block_size):
            tokens = tuple(seq.tokens(start, start + self.block_size))
            prefix_hash = block_hash(prefix_hash, tokens)
            block_id = self.hash_to_block_id.get(prefix_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break  # a miss, or a hash collision caught by the token check
            found.append(block_id)
        return found

    def allocate(self, seq: Sequence, token_budget: int) -> int | None:
        """Admit seq: take its cached prefix blocks and the blocks of its next uncached tokens, at
        most `token_budget` of them. How many tokens it will compute, or None (nothing taken) when
        too few blocks are free.

            tokens  [ cached full blocks | new tokens (<= budget) | rest of the prompt ]
            blocks  [ held, ref + 1      | taken from the free list ]
        """
        assert not seq.block_table, f"{seq} already holds blocks"
        cached = self._cached_prefix(seq)
        num_cached_tokens = len(cached) * self.block_size
        num_new_tokens = min(seq.num_tokens - num_cached_tokens, token_budget)
        # A cached block nobody holds sits in the free list: holding it takes it from there.
        reusable_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        needed = self.blocks_needed(num_cached_tokens + num_new_tokens) - len(cached)
        if needed > self.num_free_blocks - reusable_free:
            return None
        for block_id in cached:
            self._hold(block_id)
        self.num_prefix_hits += len(cached)
        seq.block_table = list(cached)
        seq.num_computed_tokens = num_cached_tokens
        if seq.num_output_tokens == 0:
            seq.num_cached_tokens = num_cached_tokens
        while len(seq.block_table) < self.blocks_needed(num_cached_tokens + num_new_tokens):
            seq.block_table.append(self._take_free_block())
        return num_new_tokens

    def _needs_copy(self, seq: Sequence) -> bool:
        """Whether seq's next token goes into a partial block another sequence still holds."""
        if not seq.block_table or seq.num_computed_tokens % self.block_size == 0:
            return False
        return self.blocks[seq.block_table[-1]].ref_count > 1

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Give running seq the blocks its next `num_new_tokens` tokens are written to. The
        (source, destination) block copies the workers must make first (a copy on write of a
        shared partial block), or None (nothing taken) when too few blocks are free."""
        copy = self._needs_copy(seq)
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed + int(copy) > self.num_free_blocks:
            return None
        copies = []
        if copy:
            shared = seq.block_table[-1]
            own = self._take_free_block()
            copies.append((shared, own))
            self._release(shared)
            seq.block_table[-1] = own
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        return copies

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register seq's blocks that became full (all their K/V computed) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        # Named blocks are a prefix of the table (named in order, found in order on a hit): look
        # back from the last full block to the last named one, not forward from the first.
        num_full = seq.num_computed_tokens // self.block_size
        start = num_full
        while start and self.blocks[seq.block_table[start - 1]].hash is None:
            start -= 1
        prefix_hash = self.blocks[seq.block_table[start - 1]].hash if start else None
        for i in range(start, num_full):
            block = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.tokens(i * self.block_size, (i + 1) * self.block_size))
            prefix_hash = block_hash(prefix_hash, tokens)
            block.hash, block.token_ids = prefix_hash, tokens
            # An equal block may be cached already (computed twice by two sequences at once);
            # the first one keeps the name.
            self.hash_to_block_id.setdefault(prefix_hash, block.block_id)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares every block of parent (it has computed the same prompt)."""
        for block_id in parent.block_table:
            self._hold(block_id)
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens

    def free(self, seq: Sequence) -> None:
        """Return seq's blocks; the full ones stay in the prefix cache until evicted.

        Freed last-to-first, so a prefix's first blocks are the last to be evicted.
        """
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
