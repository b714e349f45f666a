"""Checks and sizes shared by the Triton launchers.

A launcher checks everything a kernel would otherwise read wrongly in silence (shapes,
dtypes, strides, devices) before it launches, and picks block sizes by the tensors' device:
CPU tensors run in Triton's interpreter (TRITON_INTERPRET=1), where every program instance
costs milliseconds of Python, so they get large blocks and few programs; CUDA tensors get
blocks sized for the hardware (`tl.dot` needs every dimension >= 16 there).
"""

from __future__ import annotations

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, x))


def interpreting(device: torch.device) -> bool:
    """CPU tensors can only run in the interpreter; they get the interpreter's block sizes."""
    return device.type == "cpu"


def check_runnable(kernel, device: torch.device) -> None:
    """Fail with the fix instead of Triton's "0 active drivers" when CPU tensors meet a compiled kernel."""
    if interpreting(device) and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 before "
            "triton is imported, or use AttentionBackend.TORCH on the CPU"
        )
    if not interpreting(device) and device.type != "cuda":
        raise RuntimeError(f"Triton kernels run on CUDA tensors (or CPU ones in the interpreter), not {device}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"tensors are on different devices: {devices}")
    return first


def check_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in allowed:
        raise ValueError(f"{name} has dtype {tensor.dtype}; expected one of {list(allowed)}")


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int | None, ...]) -> None:
    """`expected` holds a size per dimension, None where any size goes."""
    ok = tensor.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, tensor.shape))
    if not ok:
        shown = ["*" if e is None else e for e in expected]
        raise ValueError(f"{name} has shape {list(tensor.shape)}; expected {shown}")


def check_cpu_float32(**tensors: torch.Tensor) -> None:
    """The native CPU kernels read float32 host memory."""
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name} must be a float32 CPU tensor, not {t.dtype} on {t.device}")


def check_cpu_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """The native CPU kernels read a float32 or bfloat16 cache; True for bfloat16."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype not in (torch.float32, torch.bfloat16) or t.device.type != "cpu":
            raise ValueError(f"{name} must be a float32 or bfloat16 CPU tensor, not {t.dtype} on {t.device}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    return k_cache.dtype == torch.bfloat16


def check_cpu_index(**tensors: torch.Tensor) -> None:
    """Index tensors the native CPU kernels read from host memory."""
    for name, t in tensors.items():
        check_dtype(name, t, INDEX_DTYPES)
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, not {t.device}")


def contiguous_as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x itself where it already has dtype and a contiguous last dimension, else a converted copy
    (what a kernel given a bare pointer and row strides can read)."""
    return x if x.dtype == dtype and x.stride(-1) == 1 else x.to(dtype).contiguous()


def check_unit_last_stride(**tensors: torch.Tensor) -> None:
    """Kernels address the last (head) dimension as contiguous; other strides are passed in."""
    for name, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)})")


def check_paged_cache(name: str, cache: torch.Tensor) -> None:
    """Kernels address cache rows as block * block_size + offset, so blocks must be evenly spaced."""
    if cache.stride(0) != cache.shape[1] * cache.stride(1) or cache.stride(-1) != 1:
        raise ValueError(
            f"{name} [num_blocks, block_size, g, d] must have stride(0) == block_size * stride(1) "
            f"and a contiguous last dimension; got strides {cache.stride()}"
        )
