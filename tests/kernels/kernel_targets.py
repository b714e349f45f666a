"""Where kernel tests run (see conftest.py): the targets, their tolerances, and the skips."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from tpserve.kernels.rope import _rope_kernel

INTERPRETING = isinstance(_rope_kernel, InterpretedFunction)


@dataclass(frozen=True)
class Target:
    device: str
    dtype: torch.dtype
    # assert_close tolerances for attention and RoPE outputs vs the fp32-math reference.
    rtol: float
    atol: float

    def randn(self, *shape: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(self.device, self.dtype)


# GPU tolerances: q·k and p·v run on tensor cores in bf16/fp16 with fp32 accumulation; the
# probabilities are rounded to the input dtype before p·v (as every flash kernel does), and the
# output is rounded once. bf16 keeps 8 bits of mantissa (2^-8 ~ 4e-3 relative per rounding),
# fp16 11 bits (~5e-4); the bounds below allow a few roundings on O(1) outputs.
TARGETS = [
    pytest.param(Target("cpu", torch.float32, rtol=1e-4, atol=1e-5), id="cpu-fp32"),
    pytest.param(Target("cuda", torch.bfloat16, rtol=2e-2, atol=2e-2), id="cuda-bf16", marks=pytest.mark.gpu),
    pytest.param(Target("cuda", torch.float16, rtol=5e-3, atol=5e-3), id="cuda-fp16", marks=pytest.mark.gpu),
]


def skip_unless_runnable(device: str) -> None:
    if device == "cpu" and not INTERPRETING:
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before triton is imported (make test does)")
    if device == "cuda" and (INTERPRETING or not torch.cuda.is_available()):
        pytest.skip("needs a CUDA device and compiled kernels (TRITON_INTERPRET unset)")
