"""The paged KV cache: allocated once, one (key, value) view per layer.

Layout per layer: [num_blocks, block_size, g, d] for keys and for values (g: this rank's
query groups, d: head dim). A sequence's tokens live in the blocks of its block table, in order
of position; block ids mean the same in every layer and on every rank.
"""

from __future__ import annotations

import torch

from tpserve.model.config import TransformerConfig


class KVCache:
    def __init__(
        self,
        config: TransformerConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        g, d = config.num_query_groups_local, config.kv_channels
        # [layers, 2 (k, v), num_blocks, block_size, g, d]: one allocation for the whole model.
        self.buffer = torch.zeros(config.num_layers, 2, num_blocks, block_size, g, d, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(config: TransformerConfig, block_size: int, dtype: torch.dtype) -> int:
        """Memory one block takes on one rank, over all layers, keys and values."""
        per_token = 2 * config.num_layers * config.num_query_groups_local * config.kv_channels
        return per_token * block_size * torch.empty((), dtype=dtype).element_size()

    def layer(self, layer_number: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer (0-based), each [num_blocks, block_size, g, d]."""
        return self.buffer[layer_number, 0], self.buffer[layer_number, 1]
