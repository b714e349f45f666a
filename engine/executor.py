"""`Executor`: spawns the workers, hands each step plan to all of them, watches them.

Every wait also watches each worker's process sentinel, so a worker that dies is noticed at
once: the other ranks are killed (gloo peers would otherwise wait in a collective for many
minutes), the error is kept, and every later call fails fast with it.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from multiprocessing.connection import wait
from typing import Callable

from tpserve.engine.protocol import StepBitmask, StepPlan, StepResult, WorkerCommand, WorkerConfig


class EngineDeadError(RuntimeError):
    """The workers are gone; nothing more can run until the engine is restarted."""


def _run_worker(rank: int, config: WorkerConfig, conn) -> None:
    # The worker module (the model, its kernels, CUDA graphs) is imported in the worker's
    # process only: the engine's process never loads the model.
    from tpserve.engine.worker import worker_main

    worker_main(rank, config, conn)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Executor:
    def __init__(self, config: WorkerConfig, start_timeout: float = 600.0, step_timeout: float = 600.0) -> None:
        self.step_timeout = step_timeout
        self.error: str | None = None
        # The rank that samples and answers each step (the last pipeline stage's first TP rank).
        self.driver_rank = config.driver_rank
        ctx = mp.get_context("spawn")
        config.init_method = f"tcp://127.0.0.1:{_free_port()}"
        self._conns, self._procs = [], []
        for rank in range(config.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_run_worker, args=(rank, config, child), name=f"tpserve-worker-{rank}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        ready = self._gather(start_timeout)
        # Every rank measured its own memory; all must use the same number of blocks.
        self.num_blocks = min(num_blocks for num_blocks, _ in ready)
        # Rank 0's (summary, table) of the CPU linear kernels it timed; None when pinned or on GPUs.
        self.cpu_kernel_tuning: tuple[str, str] | None = ready[0][1]

    def init_cache(self, num_blocks: int) -> None:
        for conn in self._conns:
            conn.send((WorkerCommand.INIT_CACHE, num_blocks))
        self._gather(self.step_timeout)

    def execute(self, plan: StepPlan, bitmask: Callable[[], StepBitmask] | None = None) -> StepResult:
        """Run a step. A plan with `has_bitmask` needs `bitmask`, called once the plan is out (its
        work overlaps the ranks' forward) and its answer sent to the driver alone."""
        self.check()
        data = plan.encode()
        for conn in self._conns:
            conn.send((WorkerCommand.STEP, data))  # the same bytes to every rank
        if plan.has_bitmask:
            self._conns[self.driver_rank].send((WorkerCommand.BITMASK, bitmask().encode()))
        return self._wait_driver(self.step_timeout)

    def _gather(self, timeout: float) -> list:
        """One answer from every rank."""
        answers: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(self._conns):
            ready = self._wait(deadline)
            for rank, conn in enumerate(self._conns):
                if conn in ready and rank not in answers:
                    answers[rank] = self._receive(rank)
        return [answers[r] for r in range(len(self._conns))]

    def _wait_driver(self, timeout: float) -> StepResult:
        deadline = time.monotonic() + timeout
        while True:
            ready = self._wait(deadline)
            for rank, conn in enumerate(self._conns):
                if conn in ready:
                    result = self._receive(rank)  # only the driver answers a step; others only fail
                    if rank == self.driver_rank:
                        return result

    def _wait(self, deadline: float) -> list:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._fail(f"the workers did not answer within the step timeout ({self.step_timeout:.0f} s)")
        ready = wait(self._conns + [p.sentinel for p in self._procs], timeout=remaining)
        for rank, proc in enumerate(self._procs):
            if proc.sentinel in ready:
                if self._conns[rank].poll(0):
                    self._receive(rank)  # its last words: the error it sent before exiting
                proc.join(timeout=1)
                self._fail(f"worker {rank} died (exit code {proc.exitcode})")
        return ready

    def _receive(self, rank: int):
        try:
            status, value = self._conns[rank].recv()
        except (EOFError, OSError):
            self._fail(f"worker {rank} died (exit code {self._procs[rank].exitcode})")
        if status == "error":
            self._fail(f"worker {value}")
        return value

    def check(self) -> None:
        """Raise if the engine is dead; notice a worker that died while idle."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        for rank, proc in enumerate(self._procs):
            if not proc.is_alive():
                self._fail(f"worker {rank} died (exit code {proc.exitcode})")

    def _fail(self, message: str) -> None:
        self.error = self.error or message
        self._kill()
        raise EngineDeadError(self.error)

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
        for proc in self._procs:
            proc.join(timeout=5)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def shutdown(self) -> None:
        if self.error is None:
            for conn in self._conns:
                try:
                    conn.send((WorkerCommand.SHUTDOWN, None))
                except (BrokenPipeError, OSError):
                    pass
            for proc in self._procs:
                proc.join(timeout=10)
        self._kill()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []
        self.error = self.error or "the engine was shut down"
