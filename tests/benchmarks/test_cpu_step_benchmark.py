"""benchmarks/cpu_step.py on a small random model: the split of a decode step adds up, the
matmul FLOPs are the model's, and the roofline is what the measured GEMM rate gives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import random_checkpoint

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import cpu_step  # noqa: E402


@pytest.mark.parametrize("kernels", ["native", "auto"])
def test_cpu_step_splits_a_decode_step(tmp_path, monkeypatch, kernels):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path, hf_model = random_checkpoint(tmp_path)
    out = tmp_path / "result.json"
    result = cpu_step.main(["--checkpoint", str(path), "--dtype", "float32", "--cpu-kernels", kernels,
                            "--batch", "4", "--context", "9", "--steps", "3", "--output-json", str(out)])
    c = hf_model.config
    head_dim = c.hidden_size // c.num_attention_heads
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * head_dim
    per_layer = qkv * c.hidden_size + c.hidden_size * c.hidden_size + 3 * c.intermediate_size * c.hidden_size
    weights = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size
    assert result["matmul_gflops_per_step"] == round(2 * 4 * weights / 1e9, 3)
    parts = result["matmul_ms"] + result["attention_ms"] + result["rest_ms"]
    assert abs(parts - result["step_ms"]) <= 0.03 and min(result["matmul_ms"], result["attention_ms"]) > 0
    # From the exact FLOPs: the reported GFLOP are rounded to 0.001, which for this tiny model is
    # a third of the value, and the roofline of a slow (or busy) CPU magnifies that.
    assert result["roofline_ms"] == pytest.approx(
        2 * 4 * weights / 1e9 / result["peak_gemm_gflop_per_s"] * 1e3, rel=0.02, abs=0.01)
    assert (result["kernels"] is None) == (kernels != "auto")
    assert json.loads(out.read_text())["step_ms"] == result["step_ms"]
