"""Where the kernel tests run: CPU tensors in Triton's interpreter, or a CUDA device.

`make test` runs this folder in its own pytest process with TRITON_INTERPRET=1, set before
Triton is imported (Triton decides at decoration time whether a kernel is interpreted). A test
taking the `target` fixture runs once per target; each target skips itself where it cannot run:

  cpu-fp32    needs the interpreter (bf16 is wrong there, so fp32 only)
  cuda-bf16   needs CUDA and compiled kernels (run: pytest -m gpu tests/kernels, no TRITON_INTERPRET)
  cuda-fp16
"""

from __future__ import annotations

import pytest
from kernel_targets import TARGETS, Target, skip_unless_runnable


@pytest.fixture(params=TARGETS)
def target(request) -> Target:
    skip_unless_runnable(request.param.device)
    return request.param


@pytest.fixture
def interpreter() -> None:
    """For tests that run the Triton backend on CPU tensors only."""
    skip_unless_runnable("cpu")
