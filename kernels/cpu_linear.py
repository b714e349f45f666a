"""`F.linear` on the CPU through whichever implementation this machine runs fastest, per weight
shape and number of tokens.

No single choice holds across CPUs: the native register-tiled GEMM beat MKL for decode batches
on an AVX2 machine and lost to it on an AVX-512 one. So the candidates below are timed on the
machine (kernels/cpu_tuning.py), and one `LinearKernels` per weight shape calls the winner for
each token bucket (token counts rounded up to a power of two).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from tpserve.kernels import native
from tpserve.kernels.cpu_transpose import transposed

Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _check_features(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"linear takes a 2-D input and weight, not {x.dim()}-D and {weight.dim()}-D")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"linear: input has {x.shape[1]} features, the weight takes {weight.shape[1]}")


def torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` (MKL or oneDNN, as torch picks): the reference, and the default."""
    return F.linear(x, weight, bias)


def native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The register-tiled GEMM of kernels/csrc/linear_cpu.c, float32 only; `F.linear` for
    what it does not take (other dtypes, a column-strided input, no C compiler)."""
    _check_features(x, weight)
    if not (
        x.dtype == weight.dtype == torch.float32
        and x.device.type == weight.device.type == "cpu"
        and x.stride(1) == 1
        and weight.stride(1) == 1
        and (bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu"
                              and bias.shape == weight.shape[:1] and bias.is_contiguous()))
        and native.available() is None
    ):
        return F.linear(x, weight, bias)
    (t, k), n = x.shape, weight.shape[0]
    y = torch.empty(t, n, dtype=torch.float32)
    err = native.library().tpserve_linear_f32(
        x.data_ptr(), t, k, x.stride(0), weight.data_ptr(), n, weight.stride(0),
        None if bias is None else bias.data_ptr(), y.data_ptr(), n,
    )  # fmt: skip
    if err:
        raise MemoryError("the CPU linear kernel could not allocate its packing buffer")
    return y


def mm_t_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W X^T by `torch.mm`, transposed back (natively for float32): BLAS libraries run some
    skinny shapes faster in that orientation."""
    _check_features(x, weight)
    y = transposed(torch.mm(weight, x.t()))
    return y if bias is None else y + bias


@dataclass(frozen=True)
class Candidate:
    fn: Linear
    dtypes: tuple[torch.dtype, ...]

    def runs_here(self, dtype: torch.dtype) -> bool:
        return dtype in self.dtypes and (self.fn is not native_linear or native.available() is None)


CANDIDATES: dict[str, Candidate] = {
    "torch": Candidate(torch_linear, (torch.float32, torch.bfloat16, torch.float16)),
    "native": Candidate(native_linear, (torch.float32,)),
    "mm_t": Candidate(mm_t_linear, (torch.float32, torch.bfloat16, torch.float16)),
}
DEFAULT = "torch"


def token_bucket(tokens: int) -> int:
    """The power of two at or above `tokens`: the token counts timed, and the dispatch key."""
    return 1 << max(0, tokens - 1).bit_length()


def buckets_up_to(max_tokens: int) -> list[int]:
    return [1 << i for i in range(token_bucket(max_tokens).bit_length())]


class LinearKernels:
    """For one weight shape, the candidate to call for each token bucket (1, 2, 4, ...); a
    count past the last bucket takes the last bucket's candidate."""

    def __init__(self, choices: dict[int, str]) -> None:
        buckets = sorted(choices)
        if buckets != buckets_up_to(buckets[-1]):
            raise ValueError(f"token buckets must be 1, 2, 4, ... without gaps, not {buckets}")
        self.choices = {b: choices[b] for b in buckets}
        self._fns = [CANDIDATES[choices[b]].fn for b in buckets]

    @classmethod
    def pinned(cls, name: str) -> "LinearKernels":
        if name not in CANDIDATES:
            raise ValueError(f"no CPU linear kernel {name!r}; the candidates are {sorted(CANDIDATES)}")
        return cls({1: name})

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        index = max(0, x.shape[0] - 1).bit_length()
        return self._fns[min(index, len(self._fns) - 1)](x, weight, bias)

    def __repr__(self) -> str:
        return f"LinearKernels({self.choices})"
