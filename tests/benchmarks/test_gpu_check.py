"""benchmarks/gpu_check.py, the one call a lent GPU machine gets: its dry run on the CPU through
`make gpu-check DRY_RUN=1`, its time limits, and the arithmetic that sets its figures beside the
README's targets (which no CPU run reaches)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import gpu_figures  # noqa: E402
import kernel_speed  # noqa: E402
import roofline  # noqa: E402
import serve_check  # noqa: E402
import throughput  # noqa: E402
from timed_steps import run_limited  # noqa: E402


@pytest.mark.slow
def test_the_dry_run_runs_every_step_in_its_cpu_form_or_says_why_not(tmp_path):
    run = subprocess.run(["make", "-s", "gpu-check", "DRY_RUN=1", f"VENV={sys.prefix}", f"OUT={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"gpu_check.json", "gpu_check.log"}
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert report["dry_run"] and list(steps) == ["install", "env", "gpu_tests_graphs", "gpu_tests_kernels", "kernels",
                                                 "decode_b1_graphs", "decode_b1_eager", "throughput", "serve",
                                                 "tensor_parallel"]
    skipped = {name: s["reason"] for name, s in steps.items() if s["status"] == "skipped"}
    assert set(skipped) == {"install", "kernels", "decode_b1_eager", "tensor_parallel"}
    assert all(reason for reason in skipped.values())
    for name, step in steps.items():
        if name not in skipped:
            assert step["status"] == "ok" and step["seconds"] <= step["limit_s"], (name, step)
    # No wheel was installed: every step ran in this venv's Python.
    assert Path(steps["env"]["result"]["executable"]).parent == Path(sys.executable).parent
    assert steps["env"]["result"]["copy_GBps"] > 0
    # The GPU test selection is what the GPU machine runs; on the CPU every selected test skips.
    for name in ("gpu_tests_graphs", "gpu_tests_kernels"):
        counts = steps[name]["result"]["counts"]
        assert counts["skipped"] > 0 and set(counts) == {"skipped", "deselected"}, counts
    assert steps["decode_b1_graphs"]["result"]["output_tokens"] == 8
    assert steps["throughput"]["result"]["output_tokens"] == 48
    # tpserve serve --load-format dummy answered one streamed completion whole, and stopped cleanly.
    serve = steps["serve"]["result"]
    assert serve["done"] and serve["usage"]["completion_tokens"] == 8 and serve["server_exit_code"] == 0
    figures = report["figures"]
    assert 0 < figures["decode_b1_graphs"]["of_copy_bw"] and 0 < figures["engine_share_of_step"] < 1
    assert [t["met"] for t in figures["targets"]] == [None] * 4  # CPU figures are compared with nothing
    log = (tmp_path / "gpu_check.log").read_text()
    assert all(f"===== {name} " in log for name in steps if name not in skipped)


def test_a_step_past_its_limit_is_killed_and_the_next_still_runs(tmp_path):
    started = time.monotonic()
    code = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--steps", "gpu_tests_kernels,tensor_parallel",
                           "--limit", "gpu_tests_kernels=1"])
    assert code == 1 and time.monotonic() - started < 10
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert steps["gpu_tests_kernels"]["status"] == "timed_out" and steps["gpu_tests_kernels"]["seconds"] < 3
    assert steps["tensor_parallel"]["status"] == "skipped" and "one GPU" in steps["tensor_parallel"]["reason"]


def test_run_limited_kills_what_the_command_started(tmp_path):
    log, pid_file = tmp_path / "log", tmp_path / "pid"
    code, seconds, output = run_limited(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; echo started; sleep 60"],
                                        limit_s=0.5, log=log)
    assert code is None and seconds < 5 and output == "started\n" == log.read_text()
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(grandchild)
    code, _, output = run_limited(["sh", "-c", "echo second; exit 3"], limit_s=5, log=log)
    assert code == 3 and output == "second\n" and log.read_text() == "started\nsecond\n"


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_every_gpu_step_command_is_accepted_by_its_script(tmp_path):
    with pytest.raises(SystemExit):  # an empty wheel folder: `make gpu-wheels` was not run
        gpu_check.parse_args(["--wheels", str(tmp_path), "--out", str(tmp_path)])
    (tmp_path / "fastapi-0.165.0-py3-none-any.whl").touch()
    args = gpu_check.parse_args(["--wheels", str(tmp_path), "--tokenizer", str(tmp_path), "--out", str(tmp_path)])
    parsers = {"throughput.py": throughput.parse_args, "kernel_speed.py": kernel_speed.parse_args,
               "roofline.py": roofline.parse_args, "serve_check.py": serve_check.parse_args}
    scripts = []
    for step in gpu_check.plan(args, tmp_path):
        if step.argv and step.argv[1].startswith("benchmarks/"):
            script = Path(step.argv[1]).name
            parsers[script](step.argv[2:])
            scripts.append(script)
        elif step.argv and "pytest" in step.argv:
            assert (ROOT / step.argv[-1]).exists()
    assert sorted(set(scripts)) == sorted(parsers)
    assert sum(gpu_check.GPU_LIMITS_S.values()) <= gpu_check.BUDGET_S == 300


def test_llama_3_8b_weights_and_its_decode_roofline():
    hf = json.loads((ROOT / "benchmarks/configs/llama-3-8b.json").read_text())
    weights = gpu_figures.llama_weights(hf)
    assert weights == {"params": 8_030_261_248, "params_read_per_step": 8_030_261_248 - 128256 * 4096,
                       "kv_elements_per_token": 2 * 32 * 8 * 128}
    run = {"setup": {"input_len": 32, "output_len": 64}, "step_ms": 6.0, "output_tokens_per_s": 160.0}
    figure = gpu_figures.decode_roofline(run, hf, dtype_bytes=2, copy_gbps=3000.0)
    step_bytes = 2 * (7_504_924_672 + 65536 * 64)  # bf16 weights and the K/V of 32 + 64 / 2 tokens
    assert figure["bytes_per_step"] == step_bytes
    assert figure["of_copy_bw"] == round(step_bytes / 6e-3 / 3000e9, 3) == 0.834


def test_figures_are_set_against_the_targets_only_off_the_cpu():
    hf = json.loads((ROOT / "benchmarks/configs/llama-3-8b.json").read_text())
    prefill = [{"kernel": "prefill", "seqlen": s, "paged": {"TFLOPs": t}, "varlen": {"TFLOPs": t + 5},
                "baselines": {"sdpa_flash": {"TFLOPs": 335.0}, "sdpa_cudnn": {"error": "refused"}}}
               for s, t in ((4096, 310.0), (16384, 290.0))]
    decode = [{"kernel": "decode", "batch": 64, "context": 4096, "GBps": 2400.0, "of_copy_bw": 0.8,
               "baselines": {"sdpa_flash": {"of_copy_bw": 0.7}}}]
    results = {
        "env": {"device": "NVIDIA H100 80GB HBM3", "copy_GBps": 3000.0, "matmul": "8192", "matmul_TFLOPs": 790.0},
        "decode_b1_graphs": {"setup": {"input_len": 32, "output_len": 64}, "step_ms": 6.0, "output_tokens_per_s": 160},
        "kernels": {"results": prefill + decode},
        "throughput": {"num_prompts": 128, "output_tokens_per_s": 5000.0, "total_tokens_per_s": 10000.0,
                       "step_ms": 8.0, "engine_ms_per_step": 0.6, "engine_share_of_step": 0.075},
    }
    figures = gpu_figures.summarize(results, hf, dtype_bytes=2, compare=True)
    assert [(t["figure"], t["met"]) for t in figures["targets"]] == [(0.834, True), (290.0, False), (0.8, True),
                                                                     (0.075, True)]
    assert figures["prefill_attention"][0] == {"seqlen": 4096, "paged_TFLOPs": 310.0, "varlen_TFLOPs": 315.0,
                                               "sdpa_flash_TFLOPs": 335.0}
    on_cpu = gpu_figures.summarize(results, hf, dtype_bytes=2, compare=False)
    assert [t["met"] for t in on_cpu["targets"]] == [None] * 4
    results["decode_b1_eager"] = dict(results["decode_b1_graphs"], step_ms=15.0)
    assert gpu_figures.summarize(results, hf, dtype_bytes=2, compare=True)["decode_b1_graphs_speedup"] == 2.5
    del results["throughput"]
    assert gpu_figures.summarize(results, hf, dtype_bytes=2, compare=True)["targets"][3]["met"] is None


def test_pytest_counts_from_a_finished_run_and_from_one_killed_midway():
    finished = ("tests/k/test_a.py::test_x[cuda-bf16] PASSED [ 50%]\n"
                "tests/k/test_a.py::test_y[cuda-bf16] FAILED [100%]\n"
                "FAILED tests/k/test_a.py::test_y[cuda-bf16] - AssertionError: Tensor-likes are not close!\n"
                "SKIPPED [3] tests/k/test_a.py:40: needs a CUDA device\n"
                "======= 1 failed, 1 passed, 3 skipped, 7 deselected in 12.34s (0:00:12) =======\n")
    counts = gpu_check.pytest_counts(finished)
    assert counts["counts"] == {"failed": 1, "passed": 1, "skipped": 3, "deselected": 7}
    assert counts["failures"] == [{"test": "tests/k/test_a.py::test_y[cuda-bf16]",
                                   "reason": "AssertionError: Tensor-likes are not close!"}]
    assert counts["skip_reasons"] == [{"tests": 3, "reason": "tests/k/test_a.py:40: needs a CUDA device"}]
    killed = finished.split("FAILED tests")[0]
    assert gpu_check.pytest_counts(killed)["counts"] == {"passed": 1, "failed": 1}
