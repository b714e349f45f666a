"""benchmarks/serving.py and compare.py: the metric definitions against hand-built streams and
numpy's percentiles, then real runs that launch the tiny server, time its startup and stream
from it."""

from __future__ import annotations

import json
import math
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import SERVE_PINS, TPSERVE, random_checkpoint

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import compare  # noqa: E402
import serving  # noqa: E402


class CharTokenizer:
    """One token per character: the counts in the hand-built cases below are plain to see."""

    def encode(self, text, add_special_tokens=False):
        return list(text)


def test_metric_definitions_follow_vllm_bench_serve():
    # Request a: 4 chunks at 0.1 (TTFT), 0.3, 0.4, 0.7; usage says 4 tokens.
    # Request b: 2 chunks at 0.5 and 1.5, no usage: its text "xyz" counts 3 tokens.
    a = serving.RequestResult(prompt_len=10, success=True, ttft=0.1, latency=0.7, itl=[0.2, 0.1, 0.3], output_tokens=4)
    b = serving.RequestResult(prompt_len=20, success=True, ttft=0.5, latency=1.5, itl=[1.0], text="xyz")
    failed = serving.RequestResult(prompt_len=5, error="HTTP 400: bad")
    s = serving.summarize([a, b, failed], 2.0, CharTokenizer(), {"ttft": 200.0, "tpot": 250.0}, [50, 99])
    assert (s["successful_requests"], s["failed_requests"], s["errors"]) == (2, 1, ["HTTP 400: bad"])
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 7)
    assert s["output_tokens_from"] == "tokenizer"  # b had no usage
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 3.5 and s["total_token_throughput"] == 18.5
    # TPOT: a (0.7 - 0.1) / 3 = 0.2 s; b (1.5 - 0.5) / 2 = 0.5 s. Only a meets ttft <= 200 ms and tpot <= 250 ms.
    assert s["tpot_ms"]["mean"] == pytest.approx(350.0) and s["request_goodput"] == 0.5
    itl = [0.2, 0.1, 0.3, 1.0]  # pooled over both requests
    for key, values in (("ttft_ms", [0.1, 0.5]), ("itl_ms", itl), ("e2el_ms", [0.7, 1.5])):
        ms = np.array(values) * 1000
        assert s[key]["mean"] == pytest.approx(ms.mean()) and s[key]["median"] == pytest.approx(np.median(ms))
        assert s[key]["std"] == pytest.approx(ms.std())
        assert s[key]["p99"] == pytest.approx(np.percentile(ms, 99)) and s[key]["p50"] == pytest.approx(np.percentile(ms, 50))


def test_repeats_combine_to_medians_with_their_spread():
    runs = [serving.summarize([serving.RequestResult(1, True, ttft=t, latency=2 * t, output_tokens=3)], d,
                              CharTokenizer(), {}, [99]) for t, d in ((0.1, 1.0), (0.3, 4.0), (0.2, 2.0))]
    point = serving.combine(runs)
    assert point["output_throughput"] == 1.5 and point["output_throughput_spread"] == [0.75, 3.0]
    assert point["ttft_ms"]["median"] == pytest.approx(200.0) and point["ttft_ms"]["median_spread"] == pytest.approx([100.0, 300.0])
    assert point["request_goodput"] is None and point["successful_requests"] == 3


def test_sweep_points_and_bad_arguments():
    args = lambda **kw: serving.argparse.Namespace(**{"request_rate": "inf", "max_concurrency": "none", "num_prompts": "8", **kw})  # noqa: E731
    points = serving.sweep_points(args(max_concurrency="1,8", num_prompts="4,16"))
    assert [(c, n) for _, r, c, n in points] == [(1, 4), (8, 16)] and math.isinf(points[0][1])
    assert [r for _, r, _, _ in serving.sweep_points(args(request_rate="2,4"))] == [2.0, 4.0]
    with pytest.raises(SystemExit, match="not both"):
        serving.sweep_points(args(request_rate="2,4", max_concurrency="1,8"))
    with pytest.raises(SystemExit, match="3 values for 2 sweep points"):
        serving.sweep_points(args(max_concurrency="1,8", num_prompts="1,2,3"))
    with pytest.raises(SystemExit, match="ttft:MS"):
        serving.parse_goodput(["latency:5"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, _ = random_checkpoint(tmp_path_factory.mktemp("bench_ckpt"))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(checkpoint: Path) -> str:
    return (f"{TPSERVE} serve --checkpoint {checkpoint} --port {{port}} "
            "--max-model-len 128 --kv-cache-memory 8MB --log-level warning " + " ".join(SERVE_PINS))


@pytest.mark.slow
def test_serving_launches_a_server_and_measures_a_sweep(tiny, tmp_path):
    out = tmp_path / "r.json"
    result = serving.main([
        "--launch", server_command(tiny), "--port", str(free_port()), "--name", "tiny", "--tokenizer", str(tiny),
        "--max-concurrency", "1,4", "--num-prompts", "2,8", "--input-len", "12", "--output-len", "10", "--ignore-eos",
        "--repeats", "2", "--goodput", "ttft:60000", "--log-dir", str(tmp_path), "--output-json", str(out),
        "--plot", str(tmp_path / "r.png"),
    ])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    server = result["servers"][0]
    assert 0 < server["startup_s"] < 120
    for point, (concurrency, num) in zip(server["points"], ((1, 2), (4, 8))):
        assert (point["max_concurrency"], point["num_prompts"], point["failed_requests"]) == (concurrency, num, 0)
        assert point["output_tokens_from"] == "usage"
        for run in point["runs"]:
            # ignore_eos: every request streams its 10 tokens; 9 gaps each, pooled.
            assert run["successful_requests"] == num and run["total_output_tokens"] == 10 * num
            assert run["request_goodput"] == pytest.approx(run["request_throughput"])  # a 60 s TTFT SLO: all good
            assert 9 <= run["total_input_tokens"] / num <= 15
            assert run["ttft_ms"]["median"] > 0 and run["tpot_ms"]["median"] > 0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_compare_runs_ours_then_a_peer_with_its_own_request_fields(tiny, tmp_path, capsys):
    tokenizer = serving.load_tokenizer(str(tiny))
    eos = tokenizer.eos_token_id
    # The "peer" is a second tpserve that is sent no ignore_eos; it bans end-of-sequence instead.
    result = compare.main([
        "--ours", server_command(tiny), "--peer", "peer", server_command(tiny),
        "--peer-extra-body", "peer", json.dumps({"ignore_eos": None, "logit_bias": {str(eos): -100}}),
        "--port", str(free_port()), "--tokenizer", str(tiny), "--max-concurrency", "2",
        "--num-prompts", "4", "--output-len", "8", "--ignore-eos", "--repeats", "1", "--log-dir", str(tmp_path),
        "--output-json", str(tmp_path / "c.json"),
    ])
    ours, peer = result["servers"]
    assert [s["name"] for s in result["servers"]] == ["tpserve", "peer"]
    assert peer["extra_body"] == {"ignore_eos": None, "logit_bias": {str(eos): -100}}
    for server in (ours, peer):
        assert server["startup_s"] > 0
        assert server["points"][0]["runs"][0]["total_output_tokens"] == 4 * 8
    table = capsys.readouterr().out
    assert "vs tpserve" in table and "peer" in table and "startup" in table
