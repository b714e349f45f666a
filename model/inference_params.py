"""`InferenceParams`: the per-step metadata the model reads to use the paged KV cache.

Kept apart from the cache itself (model/kv_cache.py). Its tensors are views into buffers
allocated once for the largest step, so a step rewrites them in place and a decode step can
be captured in a CUDA graph; the host-side maxima let kernels size launches without a sync.

For sequence i of a step (its new tokens are packed rows cu_seqlens_q[i]:cu_seqlens_q[i+1]):

    block_tables[i]   the blocks holding its tokens, in order of position
    context_lens[i]   tokens it has in the cache once this step's are stored
    slot_mapping[j]   flat slot (block * block_size + offset) of new token j; -1: do not store
"""

from __future__ import annotations

import torch


class InferenceParams:
    def __init__(
        self,
        max_num_seqs: int,
        max_num_tokens: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self._block_tables = torch.zeros(max_num_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._context_lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self._slot_mapping = torch.zeros(max_num_tokens, dtype=torch.int64, device=device)
        self._logits_indices = torch.zeros(max_num_tokens, dtype=torch.int64, device=device)
        self.block_tables = self._block_tables[:0]
        self.context_lens = self._context_lens[:0]
        self.slot_mapping = self._slot_mapping[:0]
        # Rows of the packed tokens that need logits; None: every row.
        self.logits_indices: torch.Tensor | None = None
        self.max_context_len = 0

    def prepare(
        self,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        logits_indices: list[int] | None = None,
    ) -> torch.Tensor:
        """Fill the buffers for one step; returns the position id of every new token ([t] int64).

        Sequence i's new tokens are the last query_lens[i] of its context_lens[i] tokens, so
        token j of it sits at position context_lens[i] - query_lens[i] + j.
        """
        b, t = len(query_lens), sum(query_lens)
        if b > self._context_lens.numel() or t > self._slot_mapping.numel():
            raise ValueError(
                f"step of {b} sequences / {t} tokens exceeds max_num_seqs={self._context_lens.numel()} "
                f"/ max_num_tokens={self._slot_mapping.numel()}"
            )
        positions, slots = [], []
        for i, (q_len, ctx, table) in enumerate(zip(query_lens, context_lens, block_tables, strict=True)):
            if not 0 <= q_len <= ctx or len(table) * self.block_size < ctx:
                raise ValueError(
                    f"sequence {i}: {q_len} new tokens, {ctx} in context and {len(table)} blocks of "
                    f"{self.block_size} do not fit together"
                )
            if len(table) > self.max_blocks_per_seq:
                raise ValueError(f"sequence {i}: {len(table)} blocks > max_blocks_per_seq={self.max_blocks_per_seq}")
            for pos in range(ctx - q_len, ctx):
                positions.append(pos)
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
        # One copy of the step's widest table: columns past it are never read (a sequence reads
        # its first ceil(context / block_size) entries), so they may keep an earlier step's ids.
        width = max(map(len, block_tables), default=0)
        if width:
            padded = [table + [0] * (width - len(table)) for table in block_tables]
            self._block_tables[:b, :width].copy_(torch.tensor(padded, dtype=torch.int32))
        self._context_lens[:b].copy_(torch.tensor(context_lens, dtype=torch.int32))
        self._slot_mapping[:t].copy_(torch.tensor(slots, dtype=torch.int64))
        self.block_tables = self._block_tables[:b]
        self.context_lens = self._context_lens[:b]
        self.slot_mapping = self._slot_mapping[:t]
        self.max_context_len = max(context_lens, default=0)
        if logits_indices is None:
            self.logits_indices = None
        else:
            k = len(logits_indices)
            self._logits_indices[:k].copy_(torch.tensor(logits_indices, dtype=torch.int64))
            self.logits_indices = self._logits_indices[:k]
        return torch.tensor(positions, dtype=torch.int64, device=self._slot_mapping.device)

    def pad_decode(self, num_seqs: int, padded_num_seqs: int) -> None:
        """Extend the prepared decode step of `num_seqs` sequences to `padded_num_seqs`, the
        batch size of a captured CUDA graph. A padding sequence stores nothing (slot -1) and
        attends to the first key of whatever block its table row names (every row holds valid
        block ids: zeros, or an earlier step's), so its output row is finite and is dropped.
        Logits are then computed for every row."""
        if not 0 <= num_seqs <= padded_num_seqs <= min(self._context_lens.numel(), self._slot_mapping.numel()):
            raise ValueError(f"cannot pad a decode step of {num_seqs} sequences to {padded_num_seqs}")
        self._context_lens[num_seqs:padded_num_seqs] = 1
        self._slot_mapping[num_seqs:padded_num_seqs] = -1
        self.block_tables = self._block_tables[:padded_num_seqs]
        self.context_lens = self._context_lens[:padded_num_seqs]
        self.slot_mapping = self._slot_mapping[:padded_num_seqs]
        self.max_context_len = max(self.max_context_len, 1)
        self.logits_indices = None
