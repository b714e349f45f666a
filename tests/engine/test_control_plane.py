"""Commands from rank 0 to every rank over torch.distributed (engine/control_plane.py), on two
gloo processes: what rank 0 takes from the engine's pipe reaches the other rank byte for byte, a
decode step's plan costs one frame, rank 0 sends heartbeats while the engine is idle, and the
driver's result comes back to rank 0."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from multiprocessing import Pipe

import pytest

from tpserve.engine.control_plane import FRAME_BYTES, ControlPlane
from tpserve.engine.protocol import Sample, StepPlan, StepResult, WorkerCommand
from tpserve.model.launcher import RankContext

pytestmark = pytest.mark.slow
TIMEOUT = timedelta(seconds=2)  # heartbeats every 0.5 s


def decode_plan(num_seqs: int) -> StepPlan:
    """A decode step as the scheduler plans it: one appended token each, every 16th a new block."""
    return StepPlan(
        seq_ids=list(range(num_seqs)), num_computed_tokens=[100 + i for i in range(num_seqs)],
        num_scheduled_tokens=[1] * num_seqs, num_samples=[1] * num_seqs,
        appended_tokens=[[7 + i] for i in range(num_seqs)], block_starts=[6] * num_seqs,
        block_tails=[[1000 + i] if i % 16 == 0 else [] for i in range(num_seqs)],
    )


def _exchange(ctx: RankContext, commands: list, idle_s: float) -> dict:
    ps = ctx.parallel_state
    control = ControlPlane(ps.rank, ps.world_size, driver_rank=1, timeout=TIMEOUT)
    engine_end, worker_end = Pipe()
    if ps.rank == 0:  # the engine: idle first, then its commands
        threading.Thread(target=lambda: (time.sleep(idle_s), [engine_end.send(c) for c in commands]),
                         daemon=True).start()
    received, heartbeats = [], 0
    while True:
        command, payload = control.next_command(worker_end if ps.rank == 0 else None)
        if command == WorkerCommand.HEARTBEAT:
            heartbeats += 1
            continue
        received.append((command, payload, control.bytes_broadcast))
        if command == WorkerCommand.SHUTDOWN:
            break
    result = StepResult(samples={3: [Sample(42, -0.5, [(42, -0.5)])]}) if ps.rank == 1 else None
    return {"received": received, "heartbeats": heartbeats, "result": control.result_to_rank0(result)}


def test_commands_reach_every_rank_and_results_come_back(worker_groups):
    small = decode_plan(200).encode()
    large = decode_plan(2000).encode()
    assert len(small) < FRAME_BYTES - 16 < len(large)  # 200 decoding sequences fit one frame
    commands = [(WorkerCommand.STEP, small), (WorkerCommand.STEP, large), (WorkerCommand.SHUTDOWN, b"")]
    rank0, rank1 = worker_groups.get(1, 2).run(_exchange, commands, idle_s=1.6)
    assert [(c, p) for c, p, _ in rank1["received"]] == commands
    assert [(c, p) for c, p, _ in rank0["received"]] == commands
    # Rank 0's bytes on the wire after each command: heartbeats' frames, then one frame for the
    # small plan, a frame and the rest for the large one.
    # (Rank 0 sends heartbeats while it waits on the pipe; the others see them as commands.)
    assert rank0["heartbeats"] == 0 and rank1["heartbeats"] >= 2
    assert rank0["received"][0][2] - FRAME_BYTES == rank1["heartbeats"] * FRAME_BYTES
    assert rank0["received"][1][2] - rank0["received"][0][2] == FRAME_BYTES + len(large) - (FRAME_BYTES - 16)
    assert StepPlan.decode(rank1["received"][0][1]) == decode_plan(200)
    assert rank0["result"] == StepResult(samples={3: [Sample(42, -0.5, [(42, -0.5)])]}) and rank1["result"] is None
