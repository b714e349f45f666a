"""The dtype a model is served in when none is asked for."""

from __future__ import annotations

import torch

from tpserve.kernels.cpu_info import has_native_bf16


def default_dtype(device: torch.device | str, cpu_flags: frozenset[str] | None = None) -> torch.dtype:
    """bfloat16 on GPUs and on CPUs that compute it natively (AVX512_BF16 or AMX); float32 on
    other CPUs, where bfloat16 matmuls are converted in software and run slower than float32.
    `cpu_flags` defaults to this machine's."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    return torch.bfloat16 if has_native_bf16(cpu_flags) else torch.float32
