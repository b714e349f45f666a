"""The paged KV cache: allocated once, one (key, value) view per layer.

Layout per layer: [num_blocks, block_size, g, d] for keys and for values (g: this rank's
query groups, d: head dim). A sequence's tokens live in the blocks of its block table, in order
of position; block ids mean the same in every layer and on every rank.
"""

from __future__ import annotations

import math
import mmap

import torch

from tpserve.model.config import TransformerConfig


def _zeros_in_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in memory the kernel is asked to back with transparent huge pages.

    A sequence's blocks end up anywhere in a cache of many GiB (freed blocks go to the back of
    the free list, so allocation walks the whole cache), and with 4 KiB pages nearly every block
    the attention reads costs a TLB miss; 2 MiB pages make a large cache as fast as a small one
    (the README gives the measured step times, and the CPU). Where the kernel has no huge pages,
    this is plain zeroed memory.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(shape, dtype=dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    # frombuffer holds a reference to the mapping for as long as any view of the tensor lives.
    buffer = torch.frombuffer(memory, dtype=dtype).view(shape)
    return buffer.zero_()  # fault every page in now, at start-up, not in the first steps


class KVCache:
    def __init__(
        self,
        config: TransformerConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        num_layers: int | None = None,
    ) -> None:
        """`num_layers`: the layers this rank holds (a pipeline stage's); default all of them."""
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        g, d = config.num_query_groups_local, config.kv_channels
        # [layers, 2 (k, v), num_blocks, block_size, g, d]: one allocation for the whole model.
        shape = (num_layers or config.num_layers, 2, num_blocks, block_size, g, d)
        if torch.device(device).type == "cpu":
            self.buffer = _zeros_in_huge_pages(shape, dtype)
        else:
            self.buffer = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(
        config: TransformerConfig, block_size: int, dtype: torch.dtype, num_layers: int | None = None
    ) -> int:
        """Memory one block takes on one rank, over its layers (all by default), keys and values."""
        per_token = 2 * (num_layers or config.num_layers) * config.num_query_groups_local * config.kv_channels
        return per_token * block_size * dtype.itemsize

    def layer(self, layer_number: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer (0-based), each [num_blocks, block_size, g, d]."""
        return self.buffer[layer_number, 0], self.buffer[layer_number, 1]
