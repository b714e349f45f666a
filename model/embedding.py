"""`LanguageModelEmbedding`: word embeddings (vocab-parallel) plus learned absolute positions."""

from __future__ import annotations

import torch
from torch import nn

from tpserve.model.config import TransformerConfig
from tpserve.model.parallel_state import ParallelState
from tpserve.model.tensor_parallel.layers import VocabParallelEmbedding


class LanguageModelEmbedding(nn.Module):
    def __init__(
        self,
        config: TransformerConfig,
        vocab_size: int,
        unpadded_vocab_size: int,
        max_sequence_length: int,
        position_embedding_type: str,
        parallel_state: ParallelState,
    ) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(
            vocab_size,
            config.hidden_size,
            parallel_state=parallel_state,
            params_dtype=config.params_dtype,
            valid_rows=unpadded_vocab_size,
        )
        self.position_embeddings = None
        if position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(
                max_sequence_length, config.hidden_size, dtype=config.params_dtype
            ).requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.word_embeddings(input_ids)  # [t, h]
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings(position_ids)
        return embeddings
