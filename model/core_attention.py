"""Core attention backends: RoPE, storing K/V in the paged cache, and attention.

The three steps sit together behind one module because a fast backend fuses them (the Triton
and native CPU backends rotate q and k in place on the fused QKV output, then store and attend).
The layer spec picks the backend class explicitly; `AttentionBackend.default_for` looks only at
the device and, on the CPU, at whether the native kernels build.

Input is the fused QKV output of one rank, laid out per query group as Megatron-Core does:
[t, g, n/g + 2, d] = for each group, its n/g query heads, then its key head, then its value head.
"""

from __future__ import annotations

import enum
import functools
import logging

import torch
from torch import nn

from tpserve.kernels import native
from tpserve.kernels.attention import (
    paged_attention,
    paged_attention_reference,
    paged_decode_attention_torch,
    varlen_attention,
    varlen_attention_reference,
)
from tpserve.kernels.cpu_attention import paged_attention_cpu
from tpserve.kernels.cpu_rope_store import rope_store_kv_cpu
from tpserve.kernels.kv_cache import store_kv, store_kv_reference
from tpserve.kernels.rope import rope_, rope_reference
from tpserve.model.config import TransformerConfig
from tpserve.model.inference_params import InferenceParams
from tpserve.model.packed_seq_params import PackedSeqParams
from tpserve.model.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)


class AttentionBackend(enum.Enum):
    TORCH = "torch"  # the kernels' torch references
    CPU = "cpu"  # the native CPU kernels (kernels/csrc); the default on the CPU
    TRITON = "triton"  # the Triton kernels; the default on CUDA

    @classmethod
    def default_for(cls, device: torch.device | str) -> "AttentionBackend":
        if torch.device(device).type == "cuda":
            return cls.TRITON
        why_not = native.available()
        if why_not is not None:
            _warn_once(f"the native CPU attention kernel is unavailable ({why_not}); running the torch backend")
            return cls.TORCH
        return cls.CPU


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


class _CoreAttention(nn.Module):
    """What the backends share: the softmax scale, the window, and this layer's cache view."""

    def __init__(self, config: TransformerConfig, layer_number: int) -> None:
        super().__init__()
        self.config = config
        self.layer_number = layer_number
        self.softmax_scale = config.kv_channels**-0.5
        self.window_left = config.window_size[0] if config.window_size else None
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.kv_cache = (k_cache, v_cache)

    def bound_kv_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (k_cache, v_cache); a step through the cache before one is bound is a bug."""
        if self.kv_cache is None:
            raise RuntimeError("inference_params were given but no KV cache is bound; call GPTModel.bind_kv_cache")
        return self.kv_cache


class TorchDotProductAttention(_CoreAttention):
    """The kernels' torch references: q and k rotated into copies, attention per sequence."""

    def forward(
        self,
        qkv: torch.Tensor,  # [t, g, n/g + 2, d]
        position_ids: torch.Tensor,  # [t]
        rotary: RotaryEmbedding | None,
        packed_seq_params: PackedSeqParams,
        inference_params: InferenceParams | None,
    ) -> torch.Tensor:
        t, g, _, d = qkv.shape
        heads_per_group = qkv.shape[2] - 2
        query = qkv[:, :, :heads_per_group].reshape(t, g * heads_per_group, d)  # [t, n, d]
        key = qkv[:, :, heads_per_group]  # [t, g, d]
        value = qkv[:, :, heads_per_group + 1]  # [t, g, d]
        if rotary is not None:
            query, key = rope_reference(
                query, key, position_ids, rotary.cos_cache, rotary.sin_cache, self.config.rotary_interleaved
            )
        if inference_params is None:
            # A whole-sequence forward: every sequence attends to its own new tokens only.
            return varlen_attention_reference(
                query, key, value, packed_seq_params.cu_seqlens_q, self.softmax_scale, self.window_left
            )
        k_cache, v_cache = self.bound_kv_cache()
        store_kv_reference(key, value, k_cache, v_cache, inference_params.slot_mapping)
        if packed_seq_params.max_seqlen_q == 1 and t == inference_params.context_lens.numel():
            # A decode step (one token per sequence): one batched attention, not a loop.
            return paged_decode_attention_torch(
                query, k_cache, v_cache, inference_params.context_lens, inference_params.block_tables,
                self.softmax_scale, inference_params.max_context_len, self.window_left,
            )
        return paged_attention_reference(
            query,
            k_cache,
            v_cache,
            packed_seq_params.cu_seqlens_q,
            inference_params.context_lens,
            inference_params.block_tables,
            self.softmax_scale,
            self.window_left,
        )


class CpuDotProductAttention(TorchDotProductAttention):
    """The native CPU kernels, C counterparts of the Triton backend's: RoPE and the K/V store in
    one pass, in place on the fused QKV tensor, then attention reading q through a strided view
    of it and keys and values straight from the paged cache, where the torch path gathers a
    padded copy of every sequence (at decode, most of its attention time).

    The kernels compute in float32 over a float32 or bfloat16 cache, for head dims divisible by
    8, and serve steps through the cache. A bf16 model's QKV is widened to float32 first (a few
    hundred values per token) while its cache stays bf16, read at half the bytes; other dtypes,
    other head dims and the whole-sequence forward run the torch references.
    """

    def forward(
        self,
        qkv: torch.Tensor,  # [t, g, n/g + 2, d]; its q and k heads are rotated in place
        position_ids: torch.Tensor,  # [t]
        rotary: RotaryEmbedding | None,
        packed_seq_params: PackedSeqParams,
        inference_params: InferenceParams | None,
    ) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache or (None, None)
        if (
            inference_params is None
            or qkv.dtype not in (torch.float32, torch.bfloat16)
            or k_cache is None
            or k_cache.dtype != qkv.dtype
            or qkv.shape[-1] % 8
        ):
            return super().forward(qkv, position_ids, rotary, packed_seq_params, inference_params)
        dtype = qkv.dtype
        qkv = qkv.float()
        rope_store_kv_cpu(
            qkv,
            position_ids,
            rotary.cos_cache if rotary is not None else None,
            rotary.sin_cache if rotary is not None else None,
            self.config.rotary_interleaved,
            k_cache,
            v_cache,
            inference_params.slot_mapping,
        )
        out = paged_attention_cpu(
            qkv[:, :, : qkv.shape[2] - 2],  # [t, g, n/g, d] view
            k_cache,
            v_cache,
            packed_seq_params.cu_seqlens_q,
            inference_params.context_lens,
            inference_params.block_tables,
            self.softmax_scale,
            self.window_left,
        )  # [t, n, d]
        return out.to(dtype)


class TritonDotProductAttention(_CoreAttention):
    """The Triton kernels: RoPE in place on the fused QKV tensor, then K/V store and attention
    reading q, k and v through strided views of it, so no head is copied out.

    Launch sizes come from host-side values only (PackedSeqParams.max_seqlen_q,
    InferenceParams.max_context_len, tensor shapes), so a decode step can be captured in a CUDA
    graph. Same constructor, `bind_kv_cache` and `forward` as the torch backend.
    """

    def forward(
        self,
        qkv: torch.Tensor,  # [t, g, n/g + 2, d]; its q and k heads are rotated in place
        position_ids: torch.Tensor,  # [t]
        rotary: RotaryEmbedding | None,
        packed_seq_params: PackedSeqParams,
        inference_params: InferenceParams | None,
    ) -> torch.Tensor:
        heads_per_group = qkv.shape[2] - 2
        if rotary is not None:
            rope_(qkv, position_ids, rotary.cos_cache, rotary.sin_cache, self.config.rotary_interleaved)
        query = qkv[:, :, :heads_per_group]  # [t, g, n/g, d] view
        key = qkv[:, :, heads_per_group]  # [t, g, d] view
        value = qkv[:, :, heads_per_group + 1]  # [t, g, d] view
        if inference_params is None:
            # A whole-sequence forward: every sequence attends to its own new tokens only.
            return varlen_attention(
                query, key, value, packed_seq_params.cu_seqlens_q, self.softmax_scale, self.window_left
            )  # [t, n, d]
        k_cache, v_cache = self.bound_kv_cache()
        store_kv(key, value, k_cache, v_cache, inference_params.slot_mapping)
        return paged_attention(
            query,
            k_cache,
            v_cache,
            packed_seq_params.cu_seqlens_q,
            inference_params.context_lens,
            inference_params.block_tables,
            self.softmax_scale,
            self.window_left,
            max_seqlen_q=packed_seq_params.max_seqlen_q,
            max_context_len=inference_params.max_context_len,
        )  # [t, n, d]
