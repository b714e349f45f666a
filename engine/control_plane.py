"""Commands from rank 0 to every rank, and the driver's answer back to rank 0, over torch.distributed.

The engine talks to one worker only, global rank 0, through a pipe: it is the engine process's
child. Rank 0 broadcasts each command with its bytes (a step plan) to every rank on a gloo group
of its own, whether the others are its siblings on this machine or headless processes torchrun
started on other nodes: one code path for both. A command travels in one broadcast of a
fixed-size frame (header and bytes) when it fits, as a decode step's plan does; a larger one (a
plan with many new prompts) takes a second broadcast for the rest. The driver (the last pipeline
stage's first tensor-parallel rank) sends its step result back to rank 0 the same way.

Idle is not dead. While the engine has nothing to run, rank 0 broadcasts a heartbeat every few
seconds, so ranks waiting for the next command never reach the collective timeout: that timeout
is kept for real steps, where a peer that does not answer is hung or gone. A rank that dies
breaks the group's connections, so the others fail at their next broadcast (a heartbeat at the
latest) and exit; none waits forever.
"""

from __future__ import annotations

import pickle
import struct
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from tpserve.engine.protocol import StepResult, WorkerCommand

# Every command costs one frame; a decode step's plan is 9 ints per sequence, so 8 KiB holds the
# deltas of ~220 sequences in one broadcast, and a heartbeat stays cheap.
FRAME_BYTES = 8 * 1024
_HEADER = struct.Struct("<qq")  # command, payload length
_COMMANDS = list(WorkerCommand)


def heartbeat_interval(timeout: timedelta) -> float:
    """Seconds between idle heartbeats: several fit in the collective timeout."""
    return min(2.0, timeout.total_seconds() / 4)


class ControlPlane:
    def __init__(self, rank: int, world_size: int, driver_rank: int, timeout: timedelta) -> None:
        self.rank = rank
        self.driver_rank = driver_rank
        self.heartbeat_s = heartbeat_interval(timeout)
        # gloo whatever the model's backend: the bytes are host data, and NCCL would tie a GPU
        # stream to every heartbeat.
        self.group = dist.new_group(backend="gloo", timeout=timeout) if world_size > 1 else None
        self._frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
        self.bytes_broadcast = 0  # the plans' share of the group's traffic, for the tests and benchmarks

    def next_command(self, conn: Connection | None) -> tuple[WorkerCommand, bytes]:
        """Rank 0: the engine's next command (heartbeats go out while it waits), broadcast.
        Other ranks: the command rank 0 broadcast."""
        command, payload = None, b""
        if self.rank == 0:
            if self.group is not None:
                while not conn.poll(self.heartbeat_s):
                    self._broadcast(WorkerCommand.HEARTBEAT, b"")
            command, payload = conn.recv()
        return self._broadcast(command, payload)

    def _broadcast(self, command: WorkerCommand | None, payload: bytes) -> tuple[WorkerCommand, bytes]:
        if self.group is None:
            return command, payload
        room = FRAME_BYTES - _HEADER.size
        if self.rank == 0:
            head = _HEADER.pack(_COMMANDS.index(command), len(payload)) + payload[:room]
            self._frame[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        dist.broadcast(self._frame, src=0, group=self.group)
        code, length = _HEADER.unpack(self._frame[: _HEADER.size].numpy().tobytes())
        if self.rank == 0:
            self.bytes_broadcast += FRAME_BYTES + max(0, length - room)
        if length > room:
            rest = torch.empty(length - room, dtype=torch.uint8)
            if self.rank == 0:
                rest.copy_(torch.frombuffer(bytearray(payload[room:]), dtype=torch.uint8))
            dist.broadcast(rest, src=0, group=self.group)
        if self.rank != 0:
            payload = self._frame[_HEADER.size : _HEADER.size + min(length, room)].numpy().tobytes()
            if length > room:
                payload += rest.numpy().tobytes()
        return _COMMANDS[code], payload

    def result_to_rank0(self, result: StepResult | None) -> StepResult | None:
        """The driver's step result, on rank 0 (None on the other ranks)."""
        if self.driver_rank == 0:
            return result if self.rank == 0 else None
        if self.rank == self.driver_rank:
            self._send_bytes(pickle.dumps(result), 0)
        elif self.rank == 0:
            return pickle.loads(self._recv_bytes(self.driver_rank))
        return None

    def send_to_driver(self, data: bytes) -> None:
        """Rank 0 passes the engine's side message for the sampling rank (a structured-output
        bitmask) on to the driver, when that is another rank."""
        self._send_bytes(data, self.driver_rank)

    def receive_from_rank0(self) -> bytes:
        return self._recv_bytes(0)

    def _send_bytes(self, data: bytes, dst: int) -> None:
        dist.send(torch.tensor([len(data)], dtype=torch.int64), dst=dst, group=self.group)
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=dst, group=self.group)

    def _recv_bytes(self, src: int) -> bytes:
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src=src, group=self.group)
        data = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(data, src=src, group=self.group)
        return data.numpy().tobytes()

    def min_over_ranks(self, value: int) -> int:
        if self.group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t)

    def share(self, obj):
        """Rank 0's `obj` on every rank (headless ranks learn the WorkerConfig this way)."""
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)
