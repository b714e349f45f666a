"""`F.linear` on the CPU by the fastest path this project measured for the number of tokens.

On a 2-core AVX2 machine (SmolLM2's shapes, float32):
  - 8 to 96 tokens: the native register-tiled GEMM (kernels/csrc/linear_cpu.c), 1.1-1.7x MKL;
  - up to 128 otherwise: MKL computing (W X^T), its faster orientation there, transposed back by
    the native transpose (torch's copy of the transpose took ~20 ms of a 190 ms step);
  - more tokens (prefill): `F.linear`, whose cache blocking wins from ~160 tokens on.
Other dtypes, and machines where the native kernels do not build, take the torch paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tpserve.kernels import native
from tpserve.kernels.cpu_transpose import transposed

NATIVE_TOKENS = range(8, 97)
TRANSPOSED_MAX_TOKENS = 128


def linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [t, K] @ weight [N, K]^T + bias [N] -> [t, N]."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[0] > TRANSPOSED_MAX_TOKENS:
        return F.linear(x, weight, bias)
    t = x.shape[0]
    if (
        t in NATIVE_TOKENS
        and x.dtype == weight.dtype == torch.float32
        and x.device.type == weight.device.type == "cpu"
        and x.stride(1) == 1
        and weight.stride(1) == 1
        and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"
                              and bias.shape == weight.shape[:1] and bias.is_contiguous()))
        and native.available() is None
    ):
        n, k = weight.shape
        if x.shape[1] != k:
            raise ValueError(f"linear: input has {x.shape[1]} features, the weight takes {k}")
        y = torch.empty(t, n, dtype=torch.float32)
        err = native.library().tpserve_linear_f32(
            x.data_ptr(), t, k, x.stride(0), weight.data_ptr(), n, weight.stride(0),
            None if bias is None else bias.data_ptr(), y.data_ptr(), n,
        )  # fmt: skip
        if err:
            raise MemoryError("the CPU linear kernel could not allocate its packing buffer")
        return y
    y = transposed(torch.mm(weight, x.t()))
    return y if bias is None else y + bias
