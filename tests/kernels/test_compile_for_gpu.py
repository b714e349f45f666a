"""The kernels compile for an H100 (sm_90) on a machine without one (see compile_sm90.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# An H100 gives one program at most 227 KiB of shared memory.
H100_SHARED_BYTES = 232448


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said out loud (it warns otherwise)
    script = Path(__file__).with_name("compile_sm90.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this Triton install has no ptxas to compile for CUDA")
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {k["kernel"] for k in kernels} == {
        "_rope_kernel", "_store_kv_kernel", "_prefill_kernel", "_decode_kernel", "_merge_splits_kernel"
    }
    for k in kernels:
        assert k["shared"] <= H100_SHARED_BYTES, k
