"""Where one CPU decode step's time goes, against the matmul roofline.

Loads the model in this process (SmolLM2 by default) in --dtype, gives its linear layers the
kernels the engine would (timed on this machine, or read from the cache), fills the paged KV
cache with --batch sequences of --context tokens, and times --steps decode steps of one token
per sequence (logits for every sequence, greedy argmax). Each step is split into:
  - matmuls: every linear layer's kernel call;
  - attention: RoPE, the KV-cache store and paged attention (the core-attention modules);
  - the rest: embedding, norms, activations, residual adds, the argmax, and Python between them.
The roofline is the step's matmul FLOPs at the best rate this machine's GEMM reaches on the
model's own shapes (the fastest candidate at 1024 tokens): no step can be faster than that, and
the step's time as a share of it says how much is left to win.

    python benchmarks/cpu_step.py --batch 64 --context 80 --output-json benchmarks/results/cpu_step.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from provenance import provenance, write_result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="tpserve checkpoint folder (default: the SmolLM2 default model)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--cpu-kernels", default="auto", help="auto (timed, cached) or a kernel name to pin")
    p.add_argument("--batch", type=int, default=64, help="sequences in the decode step")
    p.add_argument("--context", type=int, default=80, help="tokens each sequence holds before the first step")
    p.add_argument("--steps", type=int, default=20, help="decode steps timed (the median is reported)")
    p.add_argument("--output-json", help="where to write the results (default: print only)")
    return p.parse_args(argv)


class Stopwatch:
    """Wraps a callable and adds up the wall time spent in it."""

    def __init__(self, fn) -> None:
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def peak_gemm_rate(shapes, dtype: torch.dtype, tokens: int = 1024) -> tuple[float, str]:
    """The best FLOP/s any candidate reaches on any of the model's weight shapes at `tokens` rows."""
    from tpserve.kernels.cpu_linear import CANDIDATES
    from tpserve.kernels.cpu_tuning import time_entry

    candidates = [c for c, cand in CANDIDATES.items() if cand.runs_here(dtype)]
    best, where = 0.0, ""
    for n, k in sorted({(s.n, s.k) for s in shapes}):
        entry = time_entry(n, k, tokens, dtype, candidates)
        for c, us in entry.median_us.items():
            rate = 2 * n * k * tokens / (us * 1e-6)
            if rate > best:
                best, where = rate, f"{c} on {n}x{k} at {tokens} tokens"
    return best, where


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from tpserve.kernels.cpu_info import cpu_flags, cpu_model
    from tpserve.kernels.cpu_linear import LinearKernels
    from tpserve.kernels.cpu_tuning import tune_linears
    from tpserve.model.checkpoint import load_model, prepare_default_model
    from tpserve.model.checkpoint.format import parse_dtype
    from tpserve.model.dtype import default_dtype
    from tpserve.model.inference_params import InferenceParams
    from tpserve.model.kv_cache import KVCache

    dtype = default_dtype("cpu") if args.dtype == "auto" else parse_dtype(args.dtype)
    checkpoint = Path(args.checkpoint) if args.checkpoint else prepare_default_model()
    model = load_model(checkpoint, dtype=dtype, progress=False)
    shapes = model.cpu_linear_shapes(2048, 256)  # the engine's default limits: its cache entries
    tuning = None
    if args.cpu_kernels == "auto":
        tuning = tune_linears(shapes, dtype, time_box=60)
        model.bind_cpu_linear_kernels(tuning.kernels)
        print(tuning.summary())
    else:
        model.bind_cpu_linear_kernels({(s.n, s.k): LinearKernels.pinned(args.cpu_kernels) for s in shapes})

    block_size = 16
    blocks_per_seq = -(-(args.context + args.steps) // block_size)
    cache = KVCache(model.config, args.batch * blocks_per_seq, block_size, dtype)
    model.bind_kv_cache(cache)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(args.batch)]
    params = InferenceParams(max_num_seqs=args.batch, max_num_tokens=args.batch * args.context,
                             max_blocks_per_seq=blocks_per_seq, block_size=block_size)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        from tpserve.model.packed_seq_params import PackedSeqParams

        ids = torch.randint(0, model.unpadded_vocab_size, (args.batch * args.context,), generator=gen)
        positions = params.prepare([args.context] * args.batch, [args.context] * args.batch, tables,
                                   logits_indices=[(i + 1) * args.context - 1 for i in range(args.batch)])
        model(ids, positions, inference_params=params,
              packed_seq_params=PackedSeqParams.from_lengths([args.context] * args.batch))
        next_ids = torch.randint(0, model.unpadded_vocab_size, (args.batch,), generator=gen)

        linears = model.linear_layers()
        attention = [layer.self_attention.core_attention for layer in model.decoder.layers]
        decode = PackedSeqParams.from_lengths([1] * args.batch)
        steps = []
        for step in range(args.steps + 2):  # two warm-up steps
            for m in linears:
                m.cpu_kernels = Stopwatch(m.cpu_kernels)
            for m in attention:
                m.forward = Stopwatch(m.forward)
            start = time.perf_counter()
            ctx = args.context + step + 1
            positions = params.prepare([1] * args.batch, [ctx] * args.batch, tables)
            logits = model(next_ids, positions, inference_params=params, packed_seq_params=decode)
            next_ids = logits.argmax(-1)
            total = time.perf_counter() - start
            matmul = sum(m.cpu_kernels.seconds for m in linears)
            attn = sum(m.forward.seconds for m in attention)
            for m in linears:
                m.cpu_kernels = m.cpu_kernels.fn
            for m in attention:
                del m.forward  # the class's forward again
            if step >= 2:
                steps.append((total, matmul, attn))
    total, matmul, attn = (statistics.median(s[i] for s in steps) for i in range(3))
    flops = sum(2 * n * k * args.batch for n, k in (m.local_weight_shape for m in linears))
    peak, peak_where = peak_gemm_rate(shapes, dtype)
    roofline_s = flops / peak
    result = {
        "benchmark": "cpu_step",
        **provenance("cpu_step.py", argv),
        "device": f"cpu ({cpu_model()}, {os.cpu_count()} cores)",
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma"))),
        "threads": torch.get_num_threads(),
        "checkpoint": str(checkpoint),
        "dtype": str(dtype).removeprefix("torch."),
        "cpu_kernels": args.cpu_kernels,
        "batch": args.batch,
        "context": args.context,
        "step_ms": round(total * 1e3, 2),
        "matmul_ms": round(matmul * 1e3, 2),
        "attention_ms": round(attn * 1e3, 2),
        "rest_ms": round((total - matmul - attn) * 1e3, 2),
        "matmul_gflops_per_step": round(flops / 1e9, 3),
        "matmul_gflop_per_s": round(flops / matmul / 1e9, 1),
        "peak_gemm_gflop_per_s": round(peak / 1e9, 1),
        "peak_gemm_measured_on": peak_where,
        "roofline_ms": round(roofline_s * 1e3, 2),
        "step_share_of_roofline": round(roofline_s / total, 3),
        "matmul_share_of_roofline": round(roofline_s / matmul, 3),
        "kernels": None if tuning is None else tuning.table().splitlines(),
    }
    print(f"{result['device']}, {result['dtype']}, {result['threads']} threads, batch {args.batch}, "
          f"context {args.context}: decode step {result['step_ms']} ms = matmuls {result['matmul_ms']} + "
          f"attention {result['attention_ms']} + the rest {result['rest_ms']}")
    print(f"matmuls: {result['matmul_gflops_per_step']} GFLOP at {result['matmul_gflop_per_s']} GFLOP/s; best GEMM "
          f"here {result['peak_gemm_gflop_per_s']} GFLOP/s ({peak_where}): roofline {result['roofline_ms']} ms, "
          f"the step reaches {100 * result['step_share_of_roofline']:.0f}% of it, the matmuls "
          f"{100 * result['matmul_share_of_roofline']:.0f}%")
    if args.output_json:
        write_result(args.output_json, result)
    return result


if __name__ == "__main__":
    main()
