"""benchmarks/engine_overhead.py: the engine runs its real scheduling, plans and detokenizing
against an instant stand-in for the workers, and reports its host time per step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import random_checkpoint

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import engine_overhead  # noqa: E402


@pytest.mark.parametrize("stream", [False, True])
def test_engine_overhead_times_the_engine_alone(tmp_path, stream):
    path, _ = random_checkpoint(tmp_path)
    out = tmp_path / "result.json"
    argv = ["--checkpoint", str(path), "--batch", "3", "--input-len", "5", "--output-len", "4",
            "--output-json", str(out)] + (["--stream"] if stream else [])
    result = engine_overhead.main(argv)
    # One step prefills the three prompts (sampling their first tokens), three decode.
    assert result["steps"] == 4
    assert 0 < result["engine_ms_per_step"] <= result["wall_ms_per_step"]
    assert json.loads(out.read_text())["steps"] == 4
