"""`GPTModel`: embedding, transformer block, output layer, with Megatron-Core's signature.

Tokens travel packed ("thd": t tokens of several sequences, no padding) as [t, h]; a 2-D
[b, s] input is packed into b sequences of s tokens and its logits returned as [b, s, V].
Attention is causal within each sequence, so `attention_mask` must be None.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from tpserve.model.config import TransformerConfig
from tpserve.model.embedding import LanguageModelEmbedding
from tpserve.model.inference_params import InferenceParams
from tpserve.model.kv_cache import KVCache
from tpserve.model.packed_seq_params import PackedSeqParams
from tpserve.model.parallel_state import ParallelState
from tpserve.model.rotary import RotaryEmbedding
from tpserve.model.spec_utils import ModuleSpec
from tpserve.kernels.cpu_linear import LinearKernels
from tpserve.kernels.cpu_tuning import LinearShape
from tpserve.model.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from tpserve.model.transformer_block import TransformerBlock


class GPTModel(nn.Module):
    def __init__(
        self,
        config: TransformerConfig,
        transformer_layer_spec: ModuleSpec,
        vocab_size: int,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = True,
        share_embeddings_and_output_weights: bool = False,
        position_embedding_type: Literal["learned_absolute", "rope"] = "learned_absolute",
        rotary_percent: float = 1.0,
        rotary_base: int = 10000,
        seq_len_interpolation_factor: float | None = None,
        *,
        parallel_state: ParallelState = ParallelState(),
        unpadded_vocab_size: int | None = None,
    ) -> None:
        """`vocab_size` is the padded size the tensors have (Megatron's meaning);
        `unpadded_vocab_size` the real vocabulary, past which logits are dropped when gathered."""
        super().__init__()
        for kind in ("tensor", "pipeline"):
            configured = getattr(config, f"{kind}_model_parallel_size")
            actual = getattr(parallel_state, f"{kind}_model_parallel_size")
            if configured != actual:
                raise ValueError(
                    f"config.{kind}_model_parallel_size={configured} but the parallel state has {actual}"
                )
        if position_embedding_type not in ("learned_absolute", "rope"):
            raise ValueError(f"position_embedding_type={position_embedding_type!r} must be 'learned_absolute' or 'rope'")
        self.config = config
        self.vocab_size = vocab_size
        self.unpadded_vocab_size = unpadded_vocab_size or vocab_size
        self.max_sequence_length = max_sequence_length
        self.pre_process = pre_process
        self.post_process = post_process
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.position_embedding_type = position_embedding_type

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config, vocab_size, self.unpadded_vocab_size, max_sequence_length, position_embedding_type, parallel_state
            )
        self.rotary_pos_emb = None
        if position_embedding_type == "rope":
            self.rotary_pos_emb = RotaryEmbedding(
                config.kv_channels, rotary_percent, rotary_base, max_sequence_length, seq_len_interpolation_factor
            )
        self.decoder = TransformerBlock(config, transformer_layer_spec, parallel_state, post_layer_norm=post_process)
        if post_process:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                parallel_state=parallel_state,
                params_dtype=config.params_dtype,
                bias=False,
                gather_output=not parallel_output,
                valid_output_size=self.unpadded_vocab_size,
                # Tied on one stage, the output layer reads the embedding's weight. On a last stage
                # without the embedding it holds its own copy, loaded from the embedding's tensor
                # (Megatron's last stage keeps one too).
                skip_weight_param_allocation=share_embeddings_and_output_weights and pre_process,
            )

    @property
    def num_local_layers(self) -> int:
        return len(self.decoder.layers)

    def bind_kv_cache(self, kv_cache: KVCache) -> None:
        """Hand each layer its view of the paged cache (allocated once, by the caller)."""
        for i, layer in enumerate(self.decoder.layers):
            layer.self_attention.core_attention.bind_kv_cache(*kv_cache.layer(i))

    def checkpoint_key(self, name: str) -> str:
        """The checkpoint's (the whole model's) name of this stage's parameter `name`."""
        if name.startswith("decoder.layers."):
            index, rest = name.removeprefix("decoder.layers.").split(".", 1)
            return f"decoder.layers.{int(index) + self.decoder.layer_offset}.{rest}"
        if name == "output_layer.weight" and self.share_embeddings_and_output_weights:
            return "embedding.word_embeddings.weight"  # a last stage's copy of the tied weight
        return name

    def held_by_another_stage(self, key: str) -> bool:
        """Whether checkpoint tensor `key` is another pipeline stage's to load."""
        if key.startswith("decoder.layers."):
            index = key.removeprefix("decoder.layers.").split(".", 1)[0]
            if index.isdigit():
                first = self.decoder.layer_offset
                return not first <= int(index) < first + self.num_local_layers and int(index) < self.config.num_layers
        if key.startswith("embedding."):
            return not self.pre_process
        if key.startswith(("decoder.final_layernorm.", "output_layer.")):
            return not self.post_process
        return False

    def linear_layers(self) -> list[ColumnParallelLinear | RowParallelLinear]:
        return [m for m in self.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]

    def cpu_linear_shapes(self, max_num_batched_tokens: int, max_logits_rows: int) -> list[LinearShape]:
        """This rank's weight shapes and the most rows each gets in one step: the output layer
        sees only the rows whose logits are sampled, every other layer all the step's tokens."""
        return [
            LinearShape(*m.local_weight_shape,
                        max_logits_rows if m is getattr(self, "output_layer", None) else max_num_batched_tokens)
            for m in self.linear_layers()
        ]

    def bind_cpu_linear_kernels(self, kernels: dict[tuple[int, int], LinearKernels]) -> None:
        """Each linear layer calls the kernels chosen for its weight shape (`F.linear` if none)."""
        for m in self.linear_layers():
            m.cpu_kernels = kernels.get(m.local_weight_shape)

    def forward(
        self,
        input_ids: torch.Tensor,  # [t] packed, or [b, s]
        position_ids: torch.Tensor,  # same shape as input_ids
        attention_mask: torch.Tensor | None = None,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inference_params: InferenceParams | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """Logits [t', V] for the rows `inference_params.logits_indices` names (all rows if
        None), or [b, s, V] for a 2-D input. V is the local vocab shard with parallel_output at
        TP > 1, else the unpadded vocabulary. Hidden states [t, h] when post_process is False."""
        if attention_mask is not None:
            raise ValueError("attention is causal within each packed sequence; pass attention_mask=None")
        if labels is not None:
            raise ValueError("tpserve serves models; computing a training loss from labels is not supported")
        batch_shape = None
        if input_ids.dim() == 2:
            if packed_seq_params is not None:
                raise ValueError("a 2-D [b, s] input describes its own packing; pass packed_seq_params=None")
            batch_shape = input_ids.shape
            packed_seq_params = PackedSeqParams.from_lengths([batch_shape[1]] * batch_shape[0], input_ids.device)
            input_ids, position_ids = input_ids.reshape(-1), position_ids.reshape(-1)  # [b*s]
        elif packed_seq_params is None:
            packed_seq_params = PackedSeqParams.from_lengths([input_ids.shape[0]], input_ids.device)

        if self.pre_process:
            hidden_states = self.embedding(input_ids, position_ids)  # [t, h]
        elif decoder_input is not None:
            hidden_states = decoder_input
        else:
            raise ValueError("pre_process=False needs decoder_input (the previous stage's hidden states)")

        hidden_states = self.decoder(
            hidden_states, position_ids, self.rotary_pos_emb, packed_seq_params, inference_params
        )
        if not self.post_process:
            return hidden_states
        if inference_params is not None and inference_params.logits_indices is not None:
            hidden_states = hidden_states[inference_params.logits_indices]  # [t', h]
        weight = self.embedding.word_embeddings.weight if self.output_layer.weight is None else None
        logits = self.output_layer(hidden_states, weight)  # [t', V/p] or gathered [t', V_padded]
        if not self.parallel_output or self.config.tensor_model_parallel_size == 1:
            logits = logits[..., : self.unpadded_vocab_size]  # padded rows are never sampled
        if batch_shape is not None and logits.shape[0] == batch_shape[0] * batch_shape[1]:
            logits = logits.view(*batch_shape, -1)  # [b, s, V]
        return logits
