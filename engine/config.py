"""`EngineConfig`: how a model is served (the model itself is described by its checkpoint).

A field's `help` metadata is its documentation, for readers and for `tpserve serve --help`,
whose engine flags are made from these fields (their names, defaults and checks included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tpserve.kernels.cpu_linear import CANDIDATES
from tpserve.model.dtype import default_dtype


@dataclass
class EngineConfig:
    checkpoint: Path
    tensor_parallel_size: int = field(default=1, metadata={"help": (
        "worker processes, one per GPU (or CPU process group rank); each holds 1/N of every weight matrix. "
        "N must divide the attention heads and query groups")})
    pipeline_parallel_size: int = field(default=1, metadata={"help": (
        "pipeline stages, each a contiguous range of the layers on its own tensor-parallel group: "
        "tensor_parallel_size x pipeline_parallel_size workers in all. It must divide the layers. One batch is "
        "in the pipeline at a time, so stages take turns (README: what that costs)")})
    max_num_seqs: int = field(default=256, metadata={"help": (
        "most sequences generated at once (the decode batch); more requests wait in the queue")})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": (
        "token budget of one step: decode tokens first, then prompt chunks up to it")})
    max_model_len: int | None = field(default=None, metadata={"help": (
        "longest prompt + completion served, in tokens; default: the model's own length (its seq_length). "
        "Lower it to fit more sequences in the KV cache")})
    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    kv_cache_memory: int | None = field(default=None, metadata={"help": (
        "KV-cache bytes per worker, e.g. 2GB or 512MB; default: measured (GPU: --gpu-memory-utilization of the "
        "card less weights and activations; CPU: a quarter of the free memory, at most 4 GiB)")})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": (
        "share of each GPU's memory tpserve may use when sizing the KV cache itself")})
    enable_prefix_caching: bool = field(default=True, metadata={"help": (
        "keep the KV blocks of full prompt blocks for later requests with the same prefix")})
    device: str | None = field(default=None, metadata={"help": '"cuda" or "cpu"; default: cuda when available'})
    # None: bfloat16 on GPUs and on CPUs that compute it natively (AVX512_BF16, AMX), else
    # float32 (model/dtype.py).
    dtype: torch.dtype | None = None
    step_timeout: float = field(default=600.0, metadata={"help": (
        "seconds a step may take before the workers are presumed hung and killed")})
    distributed_timeout: float = field(default=300.0, metadata={"help": (
        "seconds a rank waits in a collective (a step's all-reduce, send or receive, a broadcast plan) for "
        "its peers before it gives up on them; idle ranks exchange heartbeats, so an idle server never "
        "reaches it. It must exceed the longest step")})
    launcher: str = field(default="spawn", metadata={"help": (
        "spawn: the engine starts every worker on this machine. torchrun: torchrun started one process per "
        "rank on every node; this one is global rank 0's, and the engine starts only rank 0's worker, which "
        "joins the others through torchrun's MASTER_ADDR and MASTER_PORT")})
    load_format: str = field(default="auto", metadata={"help": (
        "auto: the checkpoint's weights; dummy: random weights drawn on the device, only the checkpoint's "
        "config.json read (vLLM's --load-format dummy), for benchmarking shapes no checkpoint ships")})
    enforce_eager: bool = field(default=False, metadata={"help": (
        "on a GPU, launch every decode step's kernels one by one instead of replaying CUDA graphs captured at "
        "start-up (slower at small batches; for profiling). CPU steps are always eager")})
    cpu_kernels: str = field(default="auto", metadata={"help": (
        "CPU: the kernel each linear layer runs. auto: the fastest for each weight shape and token count, timed "
        "on this machine at the first start (seconds) and cached in ~/.cache/tpserve (kernels/cpu_tuning.py); "
        "a name pins that kernel everywhere, for reproducible runs: torch (F.linear), native (tpserve's C GEMM), "
        "mm_t (W X^T by torch.mm, transposed back)")})

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype is None:
            self.dtype = default_dtype(self.device)
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 2 (one prompt token and one generated)")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if self.distributed_timeout <= 0:
            raise ValueError(f"distributed_timeout={self.distributed_timeout} must be > 0")
        if self.launcher not in ("spawn", "torchrun"):
            raise ValueError(f"launcher={self.launcher!r} must be 'spawn' or 'torchrun'")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format={self.load_format!r} must be 'auto' or 'dummy'")
        if self.cpu_kernels != "auto" and self.cpu_kernels not in CANDIDATES:
            raise ValueError(f"cpu_kernels={self.cpu_kernels!r} must be 'auto' or one of {sorted(CANDIDATES)}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory={self.kv_cache_memory} must be a positive number of bytes")
