"""`GPTModelConfig` and `GPTModelBuilder`, after Megatron Bridge's GPT builder.

The config is everything that defines the model (a `TransformerConfig` plus GPT arguments);
the builder turns it into one rank's `GPTModel`: it pads the vocabulary so it splits evenly
across ranks, picks the layer spec, and allocates the parameters on the target device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from tpserve.model.config import TransformerConfig, check_known_fields
from tpserve.model.parallel_state import ParallelState

if TYPE_CHECKING:
    from tpserve.model.core_attention import AttentionBackend
    from tpserve.model.gpt_model import GPTModel


@dataclass
class GPTModelConfig:
    transformer: TransformerConfig
    # The real vocabulary (the tokenizer's); the builder pads it for the tensors.
    vocab_size: int
    # With should_pad_vocab the vocabulary is padded as Megatron-LM pads it in training (to a
    # multiple of make_vocab_size_divisible_by * TP), so Megatron checkpoints' shapes match.
    # Without it, only to a multiple of TP. Padded logits are never sampled either way.
    make_vocab_size_divisible_by: int = 128
    should_pad_vocab: bool = False
    # Longest sequence (prompt + output) the model serves; also the learned position table size.
    seq_length: int = 1024
    parallel_output: bool = True
    share_embeddings_and_output_weights: bool = False
    position_embedding_type: Literal["learned_absolute", "rope"] = "learned_absolute"
    rotary_percent: float = 1.0
    rotary_base: float = 10000
    seq_len_interpolation_factor: float | None = None

    def __post_init__(self) -> None:
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size={self.vocab_size} must be positive")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent={self.rotary_percent} must be in (0, 1]")
        if self.seq_len_interpolation_factor is not None and self.seq_len_interpolation_factor < 1.0:
            raise ValueError(f"seq_len_interpolation_factor={self.seq_len_interpolation_factor} must be >= 1")

    def padded_vocab_size(self, tensor_model_parallel_size: int | None = None) -> int:
        tp = tensor_model_parallel_size or self.transformer.tensor_model_parallel_size
        multiple = (self.make_vocab_size_divisible_by if self.should_pad_vocab else 1) * tp
        return -(-self.vocab_size // multiple) * multiple

    def with_tensor_parallel_size(self, tp: int) -> "GPTModelConfig":
        """The same model, split over `tp` ranks (validated: heads and groups must divide)."""
        transformer = dataclasses.replace(self.transformer, tensor_model_parallel_size=tp)
        return dataclasses.replace(self, transformer=transformer)

    def with_pipeline_parallel_size(self, pp: int) -> "GPTModelConfig":
        """The same model, its layers split over `pp` stages (validated: they must split)."""
        transformer = dataclasses.replace(self.transformer, pipeline_model_parallel_size=pp)
        return dataclasses.replace(self, transformer=transformer)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "transformer"}
        out["transformer"] = self.transformer.to_dict()
        return out

    @classmethod
    def from_dict(cls, fields: dict) -> "GPTModelConfig":
        fields = dict(fields)
        check_known_fields(cls, fields)
        fields["transformer"] = TransformerConfig.from_dict(fields["transformer"])
        return cls(**fields)


class GPTModelBuilder:
    def __init__(self, model_config: GPTModelConfig) -> None:
        self.model_config = model_config

    def build_model(
        self,
        parallel_state: ParallelState = ParallelState(),
        device: torch.device | str = "cpu",
        attention_backend: AttentionBackend | None = None,
    ) -> GPTModel:
        """This rank's model, parameters uninitialised (a checkpoint fills them): its
        tensor-parallel shard of its pipeline stage's layers, with the embedding on the first
        stage and the final norm and output layer on the last."""
        # Imported here: reading a checkpoint's config (the engine's host side does) must not
        # load the model's layers and kernels.
        from tpserve.model.core_attention import AttentionBackend
        from tpserve.model.gpt_model import GPTModel
        from tpserve.model.layer_specs import default_layer_spec

        cfg = self.model_config
        transformer = cfg.transformer
        ps = parallel_state
        transformer = dataclasses.replace(transformer, tensor_model_parallel_size=ps.tensor_model_parallel_size,
                                          pipeline_model_parallel_size=ps.pipeline_model_parallel_size)
        backend = attention_backend or AttentionBackend.default_for(device)
        with torch.device(device):
            model = GPTModel(
                transformer,
                default_layer_spec(transformer, backend),
                vocab_size=cfg.padded_vocab_size(ps.tensor_model_parallel_size),
                max_sequence_length=cfg.seq_length,
                pre_process=ps.is_pipeline_first_stage,
                post_process=ps.is_pipeline_last_stage,
                parallel_output=cfg.parallel_output,
                share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
                position_embedding_type=cfg.position_embedding_type,
                rotary_percent=cfg.rotary_percent,
                rotary_base=cfg.rotary_base,
                seq_len_interpolation_factor=cfg.seq_len_interpolation_factor,
                parallel_state=parallel_state,
                unpadded_vocab_size=cfg.vocab_size,
            )
        if torch.device(device).type == "cuda":
            # GPU decode steps replay CUDA graphs: experts run without reading counts on the host.
            from tpserve.model.moe import MoELayer

            for module in model.modules():
                if isinstance(module, MoELayer):
                    module.dispatch = "dense"
        return model.eval().requires_grad_(False)
