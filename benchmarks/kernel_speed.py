"""Speed of tpserve's Triton kernels on one CUDA device, against the device's own ceilings.

For every kernel and shape: the time, the achieved rate (TFLOP/s for prefill attention, GB/s
for the memory-bound ones), and that rate as a share of what this device measurably does:
  - copy bandwidth: a large device-to-device `copy_` (bytes read + written per second);
  - matmul rate: a large bf16/fp16 `torch.mm`;
  - torch SDPA with the flash and cuDNN backends on the same attention shapes (contiguous K/V,
    so they do not pay for the paged gather ours does).

    python benchmarks/kernel_speed.py                    # everything, bf16, JSON in benchmarks/results/
    python benchmarks/kernel_speed.py --kernels decode --shapes quick
    python benchmarks/kernel_speed.py --shapes check     # what benchmarks/gpu_check.py runs (Llama-3-8B's heads)

Results are written as JSON with the device, commit, command and date. Needs CUDA and compiled
kernels (TRITON_INTERPRET unset); it refuses to run otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from provenance import provenance

KERNELS = ("rope", "store_kv", "decode", "prefill")
GQA = (1, 4, 8)
HEAD_DIMS = (64, 128)
KV_HEADS = 8  # g; n = g * GQA query heads (Llama-3-8B has g = 8, n = 32)
BLOCK_SIZE = 16
MAX_CACHE_TOKENS = 1 << 21  # b * context cap, so K/V caches fit in ~8 GiB at d = 128

# Shapes per kernel and --shapes preset. rope/store_kv: (tokens, d, gqa); decode: (batch, context,
# d, gqa); prefill: (batch, sequence length, d, gqa), fresh causal prefills. "check" is Llama-3-8B's
# heads (g 8, gqa 4, d 128) at the sizes the README's targets name: decode caches far larger than
# the L2 (128 MiB to 1 GiB), prefills of 4k-16k tokens; a decode batch and a prompt for RoPE/store.
SHAPES = {
    "rope": {
        "quick": [(1, 128, 4), (256, 128, 4)],
        "check": [(64, 128, 4), (4096, 128, 4)],
        "full": [(t, d, q) for t in (1, 64, 4096, 32768) for d in HEAD_DIMS for q in GQA],
    },
    "store_kv": {
        "quick": [(1, 128, 4), (256, 128, 4)],
        "check": [(64, 128, 4), (4096, 128, 4)],
        "full": [(t, d, 4) for t in (1, 64, 4096, 32768) for d in HEAD_DIMS],
    },
    "decode": {
        "quick": [(64, 4096, 128, 4), (1, 32768, 128, 8)],
        "check": [(1, 32768, 128, 4), (64, 4096, 128, 4), (256, 1024, 128, 4)],
        "full": [(b, c, d, q) for b in (1, 8, 64, 256) for c in (512, 4096, 32768) for d in HEAD_DIMS for q in GQA],
    },
    "prefill": {
        "quick": [(1, 4096, 128, 4)],
        "check": [(1, 4096, 128, 4), (1, 8192, 128, 4), (1, 16384, 128, 4)],
        "full": [(b, s, d, q) for b, s in ((32, 512), (8, 2048), (4, 4096), (2, 8192), (1, 16384), (1, 32768))
                 for d in HEAD_DIMS for q in GQA],
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--shapes", choices=["quick", "check", "full"], default="full",
                   help="quick: a few shapes per kernel (a smoke run); check: Llama-3-8B's heads at the sizes of the "
                        "README's targets; full: every shape (default)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/kernels-<gpu>-<date>.json)")
    return p.parse_args(argv)


def refuse_unless_gpu() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_speed.py needs a CUDA device; none is visible (torch.cuda.is_available() is False)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("benchmarks/kernel_speed.py times compiled kernels; unset TRITON_INTERPRET")


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


def measure_copy_gbps(dev) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_ms(lambda: dst.copy_(src)) / 1e6


def measure_matmul_tflops(dev, dtype) -> float:
    a = torch.randn(8192, 8192, device=dev, dtype=dtype)
    b = torch.randn(8192, 8192, device=dev, dtype=dtype)
    return 2 * 8192**3 / bench_ms(lambda: a @ b) / 1e9


def paged_cache(lens: list[int], g: int, d: int, dtype, dev):
    """K/V caches with every sequence's blocks shuffled through them, and the metadata."""
    blocks = [-(-c // BLOCK_SIZE) for c in lens]
    order = torch.randperm(sum(blocks), device=dev).to(torch.int32)
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.int32, device=dev)
    at = 0
    for i, nb in enumerate(blocks):
        tables[i, :nb] = order[at : at + nb]
        at += nb
    k_cache = torch.randn(sum(blocks), BLOCK_SIZE, g, d, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    ctx = torch.tensor(lens, dtype=torch.int32, device=dev)
    return k_cache, v_cache, tables, ctx


def sdpa_ms(q, k, v, causal: bool) -> dict:
    """torch SDPA [b, n, s, d] with each backend; an entry says why a backend did not run."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            gqa = q.shape[1] != k.shape[1]
            with sdpa_kernel(backend):
                fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)  # noqa: E731
                fn()
                out[name] = {"ms": bench_ms(fn)}
        except Exception as e:  # a backend that refuses a shape is a result, not a crash
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return out


def bench_rope(dtype, dev, shapes, copy_gbps):
    from tpserve.kernels.rope import rope_

    for t, d, gqa in SHAPES["rope"][shapes]:
        g = KV_HEADS
        qkv = torch.randn(t, g, gqa + 2, d, dtype=dtype, device=dev)
        pos = torch.randint(0, 32768, (t,), device=dev)
        freqs = torch.outer(torch.arange(32768.0, device=dev), torch.rand(d // 2, device=dev))
        cos, sin = freqs.cos(), freqs.sin()
        ms = bench_ms(lambda: rope_(qkv, pos, cos, sin, False))
        # q and k read and written once, one cos and sin row read per token.
        nbytes = t * (2 * g * (gqa + 1) * d * qkv.element_size() + d * 4 + 8)
        gbps = nbytes / ms / 1e6
        yield dict(kernel="rope", tokens=t, d=d, gqa=gqa, g=g, ms=ms, GBps=gbps, of_copy_bw=gbps / copy_gbps)


def bench_store_kv(dtype, dev, shapes, copy_gbps):
    from tpserve.kernels.kv_cache import store_kv

    for t, d, gqa in SHAPES["store_kv"][shapes]:
        g = KV_HEADS
        qkv = torch.randn(t, g, gqa + 2, d, dtype=dtype, device=dev)  # k, v: strided views, as the model has them
        k_cache, v_cache, _, _ = paged_cache([t], g, d, dtype, dev)
        slots = torch.randperm(k_cache.shape[0] * BLOCK_SIZE, device=dev)[:t]
        ms = bench_ms(lambda: store_kv(qkv[:, :, gqa], qkv[:, :, gqa + 1], k_cache, v_cache, slots))
        nbytes = t * (2 * 2 * g * d * qkv.element_size() + 8)  # k and v read and written
        gbps = nbytes / ms / 1e6
        yield dict(kernel="store_kv", tokens=t, d=d, g=g, ms=ms, GBps=gbps, of_copy_bw=gbps / copy_gbps)


def bench_decode(dtype, dev, shapes, copy_gbps):
    from tpserve.kernels.attention import decode_num_splits, paged_attention

    for b, ctx, d, gqa in SHAPES["decode"][shapes]:
        if b * ctx > MAX_CACHE_TOKENS:
            continue
        g, n = KV_HEADS, KV_HEADS * gqa
        k_cache, v_cache, tables, ctx_lens = paged_cache([ctx] * b, g, d, dtype, dev)
        q = torch.randn(b, n, d, dtype=dtype, device=dev)
        cu = torch.arange(b + 1, dtype=torch.int32, device=dev)
        splits = decode_num_splits(b, g, ctx, q.device)
        ms = bench_ms(lambda: paged_attention(q, k_cache, v_cache, cu, ctx_lens, tables, d**-0.5,
                                              max_seqlen_q=1, max_context_len=ctx))
        nbytes = 2 * b * ctx * g * d * q.element_size()  # every key and value read once
        gbps = nbytes / ms / 1e6
        row = dict(kernel="decode", batch=b, context=ctx, d=d, gqa=gqa, g=g, num_splits=splits, ms=ms,
                   GBps=gbps, of_copy_bw=gbps / copy_gbps)
        del k_cache, v_cache  # freed before the contiguous K/V SDPA reads
        k = torch.randn(b, g, ctx, d, dtype=dtype, device=dev)
        v = torch.randn_like(k)
        base = sdpa_ms(q.view(b, n, 1, d), k, v, causal=False)
        for r in base.values():
            if "ms" in r:
                r["GBps"] = nbytes / r["ms"] / 1e6
                r["of_copy_bw"] = r["GBps"] / copy_gbps
        row["baselines"] = base
        yield row


def bench_prefill(dtype, dev, shapes, matmul_tflops):
    from tpserve.kernels.attention import paged_attention, varlen_attention

    for b, s, d, gqa in SHAPES["prefill"][shapes]:
        g, n = KV_HEADS, KV_HEADS * gqa
        t = b * s
        flops = 4 * b * n * d * s * (s + 1) / 2  # causal: q·k and p·v over the lower triangle
        qkv = torch.randn(t, g, gqa + 2, d, dtype=dtype, device=dev)
        query, key, value = qkv[:, :, :gqa], qkv[:, :, gqa], qkv[:, :, gqa + 1]
        cu = torch.arange(0, t + 1, s, dtype=torch.int32, device=dev)
        row = dict(kernel="prefill", batch=b, seqlen=s, d=d, gqa=gqa, g=g)
        ms = bench_ms(lambda: varlen_attention(query, key, value, cu, d**-0.5))
        row["varlen"] = {"ms": ms, "TFLOPs": flops / ms / 1e9}
        # The same prefill reading K/V through block tables from a paged cache.
        k_cache, v_cache, tables, ctx_lens = paged_cache([s] * b, g, d, dtype, dev)
        ms = bench_ms(lambda: paged_attention(query, k_cache, v_cache, cu, ctx_lens, tables, d**-0.5,
                                              max_seqlen_q=s, max_context_len=s))
        row["paged"] = {"ms": ms, "TFLOPs": flops / ms / 1e9}
        for r in (row["varlen"], row["paged"]):
            r["of_matmul_rate"] = r["TFLOPs"] / matmul_tflops
        del k_cache, v_cache
        q = torch.randn(b, n, s, d, dtype=dtype, device=dev)
        k = torch.randn(b, g, s, d, dtype=dtype, device=dev)
        base = sdpa_ms(q, k, torch.randn_like(k), causal=True)
        for r in base.values():
            if "ms" in r:
                r["TFLOPs"] = flops / r["ms"] / 1e9
                r["of_matmul_rate"] = r["TFLOPs"] / matmul_tflops
        row["baselines"] = base
        yield row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    refuse_unless_gpu()
    import triton

    kernels = [k for k in args.kernels.split(",") if k]
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        sys.exit(f"unknown kernels {sorted(unknown)}; choose from {KERNELS}")
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    copy_gbps = measure_copy_gbps(dev)
    matmul_tflops = measure_matmul_tflops(dev, dtype)
    print(f"{torch.cuda.get_device_name(dev)}: copy {copy_gbps:.0f} GB/s, {args.dtype} matmul {matmul_tflops:.0f} TFLOP/s")
    results = []
    runs = {
        "rope": lambda: bench_rope(dtype, dev, args.shapes, copy_gbps),
        "store_kv": lambda: bench_store_kv(dtype, dev, args.shapes, copy_gbps),
        "decode": lambda: bench_decode(dtype, dev, args.shapes, copy_gbps),
        "prefill": lambda: bench_prefill(dtype, dev, args.shapes, matmul_tflops),
    }
    for name in kernels:
        for row in runs[name]():
            print(json.dumps(row))
            results.append(row)
            torch.cuda.empty_cache()
    report = dict(
        device=torch.cuda.get_device_name(dev),
        **provenance("kernel_speed.py", argv),
        torch=torch.__version__,
        triton=triton.__version__,
        dtype=args.dtype,
        copy_GBps=copy_gbps,
        matmul_TFLOPs=matmul_tflops,
        results=results,
    )
    out = args.out
    if out is None:
        gpu = torch.cuda.get_device_name(dev).replace(" ", "-")
        out = Path(__file__).parent / "results" / f"kernels-{gpu}-{report['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
