"""The machine, and the two ceilings every GPU figure is read against: copy bandwidth and matmul rate.

    python benchmarks/roofline.py --output-json env.json             # CUDA when there is one
    python benchmarks/roofline.py --device cpu --output-json env.json

Copy bandwidth: a device-to-device `copy_` of random bytes, counting bytes read plus written (what a
memory-bound kernel's "share of copy bandwidth" divides by). Matmul rate: a square `torch.mm` on
random data (zeros run faster than real data). Both are medians of many runs after a warm-up
(CUDA: `triton.testing.do_bench`, timed with events). The CPU form uses small sizes: it is the GPU
check's dry run, proving the plumbing, not measuring this machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from provenance import provenance

# Versions recorded besides torch's and Triton's: what tpserve imports on the GPU machine, from its
# image or from the carried wheels.
PACKAGES = ("transformers", "tokenizers", "safetensors", "numpy", "fastapi", "starlette", "pydantic", "pydantic-core",
            "typing-extensions", "uvicorn", "httpx", "gguf", "pytest")
# (copy bytes, matmul size, matmul dtype) per device: a copy far larger than the L2 and a matmul
# that fills every multiprocessor on the GPU; small enough for a second on the CPU.
SIZES = {"cuda": (1 << 30, 8192, torch.bfloat16), "cpu": (1 << 26, 512, torch.float32)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-json", type=Path, required=True)
    return p.parse_args(argv)


def median_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def copy_gbps(device: str, nbytes: int) -> float:
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_ms(lambda: dst.copy_(src), device) / 1e6


def matmul_tflops(device: str, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / median_ms(lambda: a @ b, device) / 1e9


def nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not run: {e}"


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine(device: str) -> dict:
    import triton

    info = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "packages": {name: version(name) for name in PACKAGES},
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info |= {
            "device": props.name,
            "device_count": torch.cuda.device_count(),
            "multiprocessors": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "nvidia_smi": nvidia_smi(),
        }
    else:
        info |= {"device": "cpu", "device_count": 0}
    return info


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    nbytes, n, dtype = SIZES[args.device]
    torch.manual_seed(0)
    result = {"benchmark": "roofline", **provenance("roofline.py", argv), **machine(args.device)}
    result |= {
        "copy_bytes": nbytes,
        "copy_GBps": round(copy_gbps(args.device, nbytes), 1),
        "matmul": f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}",
        "matmul_TFLOPs": round(matmul_tflops(args.device, n, dtype), 3),
    }
    print(f"{result['device']}: copy {result['copy_GBps']:.0f} GB/s, {result['matmul']} matmul "
          f"{result['matmul_TFLOPs']:.3g} TFLOP/s")
    args.output_json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
