"""`EngineConfig`: how a model is served (the model itself is described by its checkpoint)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tpserve.kernels.cpu_linear import CANDIDATES
from tpserve.model.dtype import default_dtype


@dataclass
class EngineConfig:
    checkpoint: Path
    tensor_parallel_size: int = 1
    # Most sequences in one step (the decode batch).
    max_num_seqs: int = 256
    # Token budget of one step: decode tokens first, then prefill chunks up to it.
    max_num_batched_tokens: int = 2048
    # Longest prompt + output served; None: the model's seq_length.
    max_model_len: int | None = None
    block_size: int = 16
    # Bytes of KV cache per rank. None: measured (GPU: gpu_memory_utilization of the card,
    # less weights and activations; CPU: a quarter of the available memory, at most 4 GiB).
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # "cuda" or "cpu"; None: cuda when available.
    device: str | None = None
    # None: bfloat16 on GPUs and on CPUs that compute it natively (AVX512_BF16, AMX), else
    # float32 (model/dtype.py).
    dtype: torch.dtype | None = None
    # Seconds a step may take before the workers are presumed hung and killed.
    step_timeout: float = 600.0
    # "auto": the checkpoint's weights; "dummy": random weights drawn on the device, only the
    # checkpoint's config.json read (vLLM's --load-format dummy), for benchmarking large shapes.
    load_format: str = "auto"
    # Never capture CUDA graphs: every decode step launches its kernels one by one (for
    # profiling or debugging a kernel). CPU steps are always eager.
    enforce_eager: bool = False
    # CPU: which kernel each linear layer runs. "auto": the fastest per weight shape and token
    # count, timed on this machine once and cached (kernels/cpu_tuning.py); a candidate's name
    # ("torch" is F.linear, "native", "mm_t") pins it everywhere, for reproducible runs.
    cpu_kernels: str = "auto"

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype is None:
            self.dtype = default_dtype(self.device)
        for name in ("tensor_parallel_size", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format={self.load_format!r} must be 'auto' or 'dummy'")
        if self.cpu_kernels != "auto" and self.cpu_kernels not in CANDIDATES:
            raise ValueError(f"cpu_kernels={self.cpu_kernels!r} must be 'auto' or one of {sorted(CANDIDATES)}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory={self.kv_cache_memory} must be a positive number of bytes")
