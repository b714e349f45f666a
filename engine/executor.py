"""`Executor`: spawns the workers, hands each command to rank 0, watches them.

Rank 0 broadcasts every command to the other ranks (engine/control_plane.py) and answers with
the driver's result, so the engine talks to one pipe whether the other ranks are its own
children (spawn: all T × P ranks on this machine) or processes torchrun started on other nodes
(torchrun: the executor spawns rank 0 only; it joins the others through torchrun's rendezvous).

Every wait also watches each spawned worker's process sentinel, so a worker that dies is noticed
at once: the other ranks are killed (gloo peers would otherwise wait in a collective until the
timeout), the error is kept, and every later call fails fast with it. A rank on another node
that dies breaks rank 0's broadcasts, so rank 0 fails and exits, and that is seen the same way.
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
        ctx = mp.get_context("spawn")
        if config.init_method != "env://":
            config.init_method = f"tcp://127.0.0.1:{_free_port()}"
        self._conns, self._procs = [], []
        for rank in range(1 if config.init_method == "env://" else config.world_size):
            # Rank 0's pipe carries commands and answers; the others' only their last words.
            parent, child = ctx.Pipe(duplex=rank == 0)
            proc = ctx.Process(target=_run_worker, args=(rank, config, child), name=f"tpserve-worker-{rank}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        # The fewest blocks any rank's memory holds (all must use the same number), and rank 0's
        # (summary, table) of the CPU linear kernels it timed (None when pinned or on GPUs).
        self.num_blocks, self.cpu_kernel_tuning = self._answer(start_timeout)

    def init_cache(self, num_blocks: int) -> None:
        self._conns[0].send((WorkerCommand.INIT_CACHE, str(num_blocks).encode()))
        self._answer(self.step_timeout)

    def execute(self, plan: StepPlan, bitmask: Callable[[], StepBitmask] | None = None) -> StepResult:
        """Run a step. A plan with `has_bitmask` needs `bitmask`, called once the plan is out (its
        work overlaps the ranks' forward) and its answer sent to the driver alone, through rank 0."""
        self.check()
        self._conns[0].send((WorkerCommand.STEP, plan.encode()))
        if plan.has_bitmask:  # rank 0 passes it on to the driver
            self._conns[0].send((WorkerCommand.BITMASK, bitmask().encode()))
        return self._answer(self.step_timeout)

    def _answer(self, timeout: float):
        """Rank 0's answer; the other ranks only ever send their last words."""
        deadline = time.monotonic() + timeout
        while True:
            ready = self._wait(deadline)
            for rank, conn in enumerate(self._conns):
                if conn in ready:
                    answer = self._receive(rank)
                    if rank == 0:
                        return answer

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
            try:
                self._conns[0].send((WorkerCommand.SHUTDOWN, b""))  # rank 0 tells the others
            except (BrokenPipeError, OSError):
                pass
            for proc in self._procs:
                proc.join(timeout=10)
        self._kill()
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []
        self.error = self.error or "the engine was shut down"
