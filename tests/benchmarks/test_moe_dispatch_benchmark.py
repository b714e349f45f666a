"""benchmarks/moe_dispatch.py on a small layer: both dispatches timed for every token count, and
the JSON written with what was run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import moe_dispatch  # noqa: E402


def test_moe_dispatch_times_both_ways(tmp_path):
    out = tmp_path / "moe.json"
    result = moe_dispatch.main(["--hidden-size", "64", "--moe-ffn-hidden-size", "96", "--num-experts", "4",
                                "--tokens", "1,16", "--repeats", "2", "--output-json", str(out)])
    assert [r["tokens"] for r in result["rows"]] == [1, 16]
    for row in result["rows"]:
        assert row["grouped_ms"] > 0 and row["dense_ms"] > 0
        assert row["dense_over_grouped"] == round(row["dense_ms"] / row["grouped_ms"], 2)
    assert json.loads(out.read_text())["setup"]["num_experts"] == 4
