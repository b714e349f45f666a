"""Checkpoint load benchmark: time, GB/s, and each rank's peak anonymous memory while loading.

    .venv/bin/python benchmarks/load.py                      # the default model (SmolLM2-135M), TP 1 and 3
    .venv/bin/python benchmarks/load.py --model random-1b    # a 1B-shaped random Llama, TP 1 and 2
    .venv/bin/python benchmarks/load.py --checkpoint DIR --tp 1 2

Every rank runs `load_model` in its own process (the WorkerGroup used by the tests). Memory is
RssAnon from /proc/self/status: the checkpoint files are memory-mapped, and their page-cache
pages would inflate plain RSS although the kernel can drop them at will. Anonymous memory is what
loading really costs: the rank's parameters (its shard) plus whatever transient copies the loader
makes. It is sampled after every tensor read (the moment a read slice and the parameters coexist)
and by a 1 ms background thread. "extra" is peak - baseline - shard, the loader's overhead; the
target is peak - baseline <= 1.2 x shard, the baseline (torch, the model's Python objects) being
the constant.

Runs are "cold" (the checkpoint's pages evicted from the page cache with posix_fadvise first,
so the disk is read) and "warm" (a second load right after).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from tpserve.model.checkpoint import load_model, prepare_default_model, read_checkpoint_info, save_checkpoint
from tpserve.model.checkpoint.format import parse_dtype
from tpserve.model.checkpoint.loader import default_dtype
from tpserve.model.launcher import RankContext, WorkerGroup

GB = 1e9


def rss_anon() -> int:
    """Anonymous resident memory of this process, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def evict(folder: Path) -> None:
    """Drop the checkpoint's pages from the page cache (only these files; nothing else is touched)."""
    for file in folder.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class PeakSampler:
    """The largest RssAnon seen, by a background thread and by explicit `sample()` calls."""

    def __init__(self) -> None:
        self.peak = rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        self.peak = max(self.peak, rss_anon())

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.sample()

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _measure(ctx: RankContext, path: Path, dtype: torch.dtype, cold: bool) -> dict:
    """On every rank: load the checkpoint, report time, bytes and memory."""
    from tpserve.model.checkpoint import safetensors_source

    ctx.state.pop("model", None)  # free a previous run's model first
    if cold and ctx.parallel_state.rank == 0:
        evict(path)
    if ctx.parallel_state.world_size > 1:
        torch.distributed.barrier()
    baseline = rss_anon()
    read = safetensors_source.SafetensorsSource.read
    sampler = PeakSampler()

    def read_and_sample(self, *args, **kwargs):
        tensor = read(self, *args, **kwargs)
        sampler.sample()  # the slice is alive and the earlier parameters are filled
        return tensor

    safetensors_source.SafetensorsSource.read = read_and_sample
    try:
        with sampler:
            start = time.perf_counter()
            model = load_model(path, ctx.parallel_state, dtype=dtype, progress=False)
            seconds = time.perf_counter() - start
    finally:
        safetensors_source.SafetensorsSource.read = read
    ctx.state["model"] = model
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": seconds, "shard": shard, "baseline": baseline, "peak": sampler.peak, "after": rss_anon()}


def random_1b(folder: Path) -> Path:
    """A Llama-shaped model of ~1.1B parameters (TinyLlama's shape), random, stored in bfloat16."""
    from tpserve.model.builder import GPTModelBuilder, GPTModelConfig
    from tpserve.model.config import TransformerConfig
    from tpserve.model.parallel_state import ParallelState

    if (folder / "config.json").is_file():
        return folder
    config = GPTModelConfig(
        transformer=TransformerConfig(
            num_layers=22, hidden_size=2048, num_attention_heads=32, num_query_groups=4, ffn_hidden_size=5632,
            normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
            add_bias_linear=False, params_dtype=torch.bfloat16,
        ),
        vocab_size=32000, seq_length=2048, position_embedding_type="rope",
    )
    model = GPTModelBuilder(config).build_model(ParallelState(), device="meta")
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.empty(p.shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
             for name, p in model.state_dict().items()}
    print(f"writing a random {sum(t.numel() for t in state.values()) / 1e9:.2f}B-parameter model to {folder}",
          file=sys.stderr)
    return save_checkpoint(folder, config, state, tokenizer_dir=None, dtype=torch.bfloat16)


def report(name: str, tp: int, mode: str, results: list[dict], file_bytes: int) -> None:
    wall = max(r["seconds"] for r in results)
    print(f"{name}  TP {tp}  {mode}: {wall:.2f} s, {file_bytes / GB / wall:.2f} GB/s "
          f"({file_bytes / GB:.2f} GB of checkpoint over all ranks)")
    for rank, r in enumerate(results):
        grown = r["peak"] - r["baseline"]
        print(f"  rank {rank}: shard {r['shard'] / GB:.3f} GB, baseline {r['baseline'] / GB:.3f} GB, "
              f"peak {r['peak'] / GB:.3f} GB (+{grown / GB:.3f} GB = {grown / r['shard']:.3f} x shard, "
              f"extra {(grown - r['shard']) / 1e6:.0f} MB), {r['shard'] / GB / r['seconds']:.2f} GB/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["default", "random-1b"], default="default")
    parser.add_argument("--checkpoint", type=Path, help="a tpserve checkpoint (instead of --model)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "tpserve-bench",
                        help="where the random model is written (reused across runs)")
    parser.add_argument("--tp", type=int, nargs="+", help="tensor-parallel sizes (default: 1 and the largest of 2/3 that fits)")
    parser.add_argument("--dtype", help="dtype to load into (default: the stored dtype)")
    args = parser.parse_args(argv)

    if args.checkpoint:
        path = args.checkpoint
    elif args.model == "default":
        path = prepare_default_model()
    else:
        path = random_1b(args.cache / "random-1b")
    info = read_checkpoint_info(path)
    dtype = parse_dtype(args.dtype) if args.dtype else info.dtype or default_dtype("cpu")
    heads = info.config.transformer.num_query_groups
    sizes = args.tp or [1, 2 if heads % 2 == 0 else 3]
    file_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"checkpoint {path}: stored {info.dtype}, loaded as {dtype}, {file_bytes / GB:.2f} GB, "
          f"{os.cpu_count()} CPUs")
    for tp in sizes:
        with WorkerGroup(tp) as group:
            for mode in ("cold", "warm"):
                results = group.run(_measure, path, dtype, mode == "cold")
                report(path.name, tp, mode, results, file_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
