"""Speed of the native CPU attention kernel against the torch paths it replaced, on this CPU.

Decode (one query per sequence over a paged cache with shuffled blocks): the C kernel against
the torch decode path (`paged_decode_attention_torch`: gather every sequence's blocks, then one
masked SDPA), as time and as the share of this machine's measured memory read bandwidth that
reading each key and value once would take. Prefill and prefill chunks over a cached prefix:
the C kernel against the per-sequence reference (`paged_attention_reference`).

    python benchmarks/cpu_attention.py          # JSON in benchmarks/results/
    python benchmarks/cpu_attention.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from provenance import provenance, write_result

BLOCK_SIZE = 16
# (batch, context, g, heads per group, d): SmolLM2-135M's attention (3 kv heads of 64, GQA 3)
# at serving batches, and a Llama-3-8B-shaped one (8 kv heads of 128, GQA 4).
DECODE = [(1, 4096, 3, 3, 64), (16, 1024, 3, 3, 64), (64, 128, 3, 3, 64), (64, 512, 3, 3, 64),
          (256, 128, 3, 3, 64), (1, 4096, 8, 4, 128), (16, 1024, 8, 4, 128), (64, 256, 8, 4, 128)]
# (new tokens, cached prefix, g, heads per group, d): one sequence.
PREFILL = [(16, 0, 3, 3, 64), (128, 0, 3, 3, 64), (512, 0, 3, 3, 64), (2048, 0, 3, 3, 64),
           (16, 512, 3, 3, 64), (256, 1024, 3, 3, 64), (512, 0, 8, 4, 128), (128, 2048, 8, 4, 128)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="two shapes of each (a smoke run)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--output-json", type=Path, default=Path("benchmarks/results/cpu_attention.json"))
    return p.parse_args()


def median_ms(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def read_gbps() -> float:
    x = torch.ones(1 << 27)  # 512 MiB, far past any cache
    return x.numel() * 4 / median_ms(x.sum) / 1e6


def paged(lens: list[int], g: int, d: int):
    """A cache with each sequence's blocks shuffled through it (as a busy block manager leaves
    them), its block tables and context lengths."""
    blocks = [-(-c // BLOCK_SIZE) for c in lens]
    order = torch.randperm(sum(blocks), dtype=torch.int32)
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    at = 0
    for i, nb in enumerate(blocks):
        tables[i, :nb] = order[at : at + nb]
        at += nb
    k_cache = torch.randn(sum(blocks), BLOCK_SIZE, g, d)
    return k_cache, torch.randn_like(k_cache), tables, torch.tensor(lens, dtype=torch.int32)


def bench_decode(shapes, gbps):
    from tpserve.kernels.attention import paged_decode_attention_torch
    from tpserve.kernels.cpu_attention import paged_attention_cpu

    for b, ctx, g, hpg, d in shapes:
        k_cache, v_cache, tables, lens = paged([ctx] * b, g, d)
        q = torch.randn(b, g * hpg, d)
        cu = torch.arange(b + 1, dtype=torch.int32)
        native = median_ms(lambda: paged_attention_cpu(q, k_cache, v_cache, cu, lens, tables, d**-0.5))
        gathered = median_ms(lambda: paged_decode_attention_torch(q, k_cache, v_cache, lens, tables, d**-0.5, ctx))
        floor_ms = 2 * b * ctx * g * d * 4 / gbps / 1e6  # every key and value read once
        yield dict(kernel="decode", batch=b, context=ctx, g=g, gqa=hpg, d=d, native_ms=native, torch_ms=gathered,
                   speedup=gathered / native, of_read_bw=floor_ms / native)


def bench_prefill(shapes):
    from tpserve.kernels.attention import paged_attention_reference
    from tpserve.kernels.cpu_attention import paged_attention_cpu

    for new, prefix, g, hpg, d in shapes:
        k_cache, v_cache, tables, lens = paged([prefix + new], g, d)
        q = torch.randn(new, g * hpg, d)
        cu = torch.tensor([0, new], dtype=torch.int32)
        native = median_ms(lambda: paged_attention_cpu(q, k_cache, v_cache, cu, lens, tables, d**-0.5), reps=3)
        ref = median_ms(lambda: paged_attention_reference(q, k_cache, v_cache, cu, lens, tables, d**-0.5), reps=3)
        yield dict(kernel="prefill", new_tokens=new, prefix=prefix, g=g, gqa=hpg, d=d, native_ms=native,
                   torch_ms=ref, speedup=ref / native)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gbps = read_gbps()
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads: memory read {gbps:.1f} GB/s")
    decode, prefill = (DECODE[1:3], PREFILL[:2]) if args.quick else (DECODE, PREFILL)
    results = []
    for row in [*bench_decode(decode, gbps), *bench_prefill(prefill)]:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
        results.append(row)
    report = dict(benchmark="cpu_attention", **provenance("cpu_attention.py"),
                  device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                  threads=args.threads, torch=torch.__version__, read_GBps=gbps, results=results)
    write_result(args.output_json, report)
    print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
