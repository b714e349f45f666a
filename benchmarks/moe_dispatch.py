"""How a MoE layer runs its experts on this machine: grouped (each expert on its own tokens, counts
read on the host) against dense (every expert on every token, weighted; no host sync, what a
CUDA-graph decode step needs), for decode batches and a prefill, on one MoE layer of random
weights in Mixtral's proportions scaled down (hidden 1024, 8 experts of width 3584, top 2).

    .venv/bin/python benchmarks/moe_dispatch.py --output-json benchmarks/results/moe_dispatch_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from provenance import provenance, write_result

from tpserve.kernels.cpu_info import cpu_flags, cpu_model
from tpserve.model.config import TransformerConfig
from tpserve.model.mlp import MLPSubmodules
from tpserve.model.moe import MoELayer, MoESubmodules
from tpserve.model.parallel_state import ParallelState
from tpserve.model.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=3584)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--tokens", default="1,8,64,512", help="tokens per call (decode batches, a prefill)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--output-json")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden_size, num_attention_heads=8, ffn_hidden_size=args.moe_ffn_hidden_size,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        num_moe_experts=args.num_experts, moe_router_topk=args.topk, params_dtype=dtype,
    )
    layer = MoELayer(config, MoESubmodules(MLPSubmodules(ColumnParallelLinear, RowParallelLinear)), ParallelState())
    torch.manual_seed(0)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.02)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, args.hidden_size, dtype=dtype)
        row = {"tokens": tokens}
        for dispatch in ("grouped", "dense"):
            layer.dispatch = dispatch
            with torch.no_grad():
                layer(x)  # warm-up
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    layer(x)
                    times.append(time.perf_counter() - start)
            row[f"{dispatch}_ms"] = round(1e3 * statistics.median(times), 3)
        row["dense_over_grouped"] = round(row["dense_ms"] / row["grouped_ms"], 2)
        rows.append(row)
        print(f"{tokens:5d} tokens: grouped {row['grouped_ms']:8.2f} ms, dense {row['dense_ms']:8.2f} ms "
              f"({row['dense_over_grouped']:.2f}x)")
    result = {
        "benchmark": "moe_dispatch",
        **provenance("moe_dispatch.py", argv),
        "device": f"cpu ({cpu_model()}, {os.cpu_count()} cores)",
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma"))),
        "threads": torch.get_num_threads(),
        "setup": vars(args),
        "rows": rows,
    }
    if args.output_json:
        write_result(args.output_json, result)
    return result


if __name__ == "__main__":
    main()
