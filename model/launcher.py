"""A group of processes, one per rank of TP × PP, that run the functions they are sent.

Used by tests and benchmarks to run the same forward on every shard: each rank joins a gloo
(CPU) or nccl (GPU) group at start-up and then waits for work. A function runs on every rank
at once with `run(fn, *args)`; it gets a `RankContext` (its `ParallelState` and a dict that
persists across calls, e.g. a loaded model) and its results come back in rank order.

If a rank raises, the others may be stuck in a collective waiting for it; the group then
kills them all and reports the rank's traceback, rather than hanging.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from tpserve.model.parallel_state import ParallelState, initialize_model_parallel


@dataclass
class RankContext:
    parallel_state: ParallelState
    state: dict[str, Any] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, tp: int, pp: int, init_method: str, threads: int, conn) -> None:
    torch.set_num_threads(threads)
    ctx = RankContext(initialize_model_parallel(rank, tp, pp, init_method, backend="gloo"))
    conn.send(("ready", None))
    while True:
        message = conn.recv()
        if message is None:
            break
        fn, args, kwargs = message
        try:
            conn.send(("ok", fn(ctx, *args, **kwargs)))
        except BaseException:  # report everything, the parent decides
            conn.send(("error", traceback.format_exc()))
    if dist.is_initialized():
        dist.destroy_process_group()


class WorkerGroupError(RuntimeError):
    pass


class WorkerGroup:
    def __init__(self, tensor_model_parallel_size: int, pipeline_model_parallel_size: int = 1,
                 threads_per_rank: int | None = None, start_timeout: float = 120.0) -> None:
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        self.world_size = world_size = tp * pp
        # The machine's cores are shared by the ranks: 2 // tp threads each on a 2-core box.
        threads = threads_per_rank or max(1, (torch.get_num_threads() or 1) // world_size)
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self._conns, self._procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_rank_main, args=(rank, tp, pp, init_method, threads, child), daemon=True,
                name=f"tpserve-rank{rank}",
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        self._collect(start_timeout)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 600.0, **kwargs: Any) -> list[Any]:
        """Call fn(RankContext, *args, **kwargs) on every rank; the results in rank order."""
        if not self.alive:
            raise WorkerGroupError("the worker group has stopped")
        for conn in self._conns:
            conn.send((fn, args, kwargs))
        return self._collect(timeout)

    def _collect(self, timeout: float) -> list[Any]:
        results: list[Any] = [None] * self.world_size
        pending = set(range(self.world_size))
        deadline = time.monotonic() + timeout
        failure = None
        while pending:
            for rank in sorted(pending):
                conn, proc = self._conns[rank], self._procs[rank]
                if conn.poll(0.05):
                    status, value = conn.recv()
                    pending.discard(rank)
                    if status == "error":
                        failure = failure or f"rank {rank} raised:\n{value}"
                        # Peers may wait in a collective for this rank forever: give them a moment.
                        deadline = min(deadline, time.monotonic() + 5.0)
                    results[rank] = value
                elif not proc.is_alive():
                    failure = failure or f"rank {rank} died with exit code {proc.exitcode}"
                    pending.discard(rank)
                    deadline = min(deadline, time.monotonic() + 5.0)
            if pending and time.monotonic() > deadline:
                failure = failure or f"ranks {sorted(pending)} did not answer within {timeout:.0f} s"
                break
        if failure:
            self.close(force=True)
            raise WorkerGroupError(failure)
        return results

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def close(self, force: bool = False) -> None:
        if not force:
            for conn in self._conns:
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
        for proc in self._procs:
            proc.join(timeout=0 if force else 10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __enter__(self) -> "WorkerGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
