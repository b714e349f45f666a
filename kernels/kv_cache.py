"""Writing new tokens' keys and values into the paged KV cache.

The cache of one layer is [num_blocks, block_size, g, d]; token i goes to flat slot
`slot_mapping[i]` = block * block_size + offset. A slot of -1 means "do not store" (a token
whose KV is already cached, or padding).
"""

from __future__ import annotations

import torch


def store_kv_reference(
    key: torch.Tensor,  # [t, g, d]
    value: torch.Tensor,  # [t, g, d]
    k_cache: torch.Tensor,  # [num_blocks, block_size, g, d]
    v_cache: torch.Tensor,  # [num_blocks, block_size, g, d]
    slot_mapping: torch.Tensor,  # [t] int64
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep]  # flat view: [num_blocks * block_size, g, d]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep]
