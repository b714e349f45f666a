"""What crosses between the engine process and the workers: a `WorkerConfig` at start-up, then
`WorkerCommand`s, a `StepPlan` out and a `StepResult` back per step.

Both sides import this module and nothing else of each other, so the engine's host side never
loads the model to get a dataclass. The scheduler alone builds plans (it remembers what each
worker knows); each worker keeps its own per-sequence state, updated from them.

`StepPlan` is the one message from the scheduler to the workers, once per step. Incremental, as in vLLM v1: a sequence is sent in full once (tokens, blocks, sampling
settings), then only as deltas: the tokens sampled since, the blocks added. Workers keep the
rest. It travels as bytes: a small JSON header for new sequences and flat int32 arrays for
the per-step part, so a decode step costs a few ints per sequence (never a pickled object),
and any transport can carry it (a pipe from the engine to rank 0, a torch.distributed broadcast
from rank 0 to the other ranks, on this node or others).

A per-step side message goes to the sampling rank only: the structured-output token bitmasks
(`StepBitmask`) of the constrained sequences that sample in this step. The mask of a step needs
the token the step before sampled, so the plan goes out first, and the engine computes the masks
while the ranks run the forward; a plan with `has_bitmask` tells the driver to read one before it
samples.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tpserve.engine.sampling_params import SamplingParams


class WorkerCommand(enum.Enum):
    INIT_CACHE = "init_cache"
    STEP = "step"
    BITMASK = "bitmask"  # a step's structured-output bitmasks, to the driver only
    SHUTDOWN = "shutdown"
    HEARTBEAT = "heartbeat"  # rank 0 to the others while the engine is idle


@dataclass
class WorkerConfig:
    checkpoint: Path
    tensor_parallel_size: int
    pipeline_parallel_size: int
    init_method: str
    device: str
    dtype: torch.dtype
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    kv_cache_memory: int | None
    gpu_memory_utilization: float
    eos_token_ids: list[int]
    random_weights: bool = False  # EngineConfig.load_format == "dummy"
    enforce_eager: bool = False  # EngineConfig.enforce_eager: capture no CUDA graph
    cpu_kernels: str = "auto"  # EngineConfig.cpu_kernels
    distributed_timeout: float = 300.0  # EngineConfig.distributed_timeout


    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass
class Sample:
    token_id: int
    logprob: float | None  # None when its request asked for no logprobs
    top: list[tuple[int, float]]  # the most likely tokens at this position, when logprobs were asked


@dataclass
class StepResult:
    """What the sampling rank returns: per scheduled sequence that sampled, its samples (n at a fork)."""

    samples: dict[int, list[Sample]] = field(default_factory=dict)
    # Per sequence asking prompt logprobs: (position, Sample of the prompt token there).
    prompt_logprobs: dict[int, list[tuple[int, Sample]]] = field(default_factory=dict)


@dataclass
class NewSequence:
    seq_id: int
    token_ids: list[int]  # every token known: the prompt, then any output made before a preemption
    num_prompt_tokens: int
    block_table: list[int]
    params: SamplingParams
    seed: int
    sample_index: int


@dataclass
class StepPlan:
    new_sequences: list[NewSequence] = field(default_factory=list)
    # Sequences the workers forget (finished, aborted, preempted) before this step.
    dropped_seq_ids: list[int] = field(default_factory=list)
    # (source, destination) KV block copies to make before this step (copy on write).
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # Per scheduled sequence, in batch order:
    seq_ids: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)  # position of its first new token
    num_scheduled_tokens: list[int] = field(default_factory=list)
    # Tokens of 0, 1 or n samples to draw from the sequence's last row (n when a request forks).
    num_samples: list[int] = field(default_factory=list)
    # Deltas: tokens appended since the last plan, and the block table's new tail from
    # block_starts[i] on (new blocks; a copy on write also replaces the last block sent).
    appended_tokens: list[list[int]] = field(default_factory=list)
    block_starts: list[int] = field(default_factory=list)
    block_tails: list[list[int]] = field(default_factory=list)
    # A StepBitmask follows this plan, to the sampling rank only.
    has_bitmask: bool = False

    def encode(self) -> bytes:
        header = json.dumps(
            [
                [s.seq_id, s.token_ids, s.num_prompt_tokens, s.block_table, _params_json(s.params), s.seed,
                 s.sample_index]
                for s in self.new_sequences
            ],
            separators=(",", ":"),
        ).encode() if self.new_sequences else b""
        ints = array("i")
        ints.append(int(self.has_bitmask))
        ints.append(len(self.dropped_seq_ids))
        ints.extend(self.dropped_seq_ids)
        ints.append(len(self.block_copies))
        for src, dst in self.block_copies:
            ints.extend((src, dst))
        ints.append(len(self.seq_ids))
        for i in range(len(self.seq_ids)):
            ints.extend((self.seq_ids[i], self.num_computed_tokens[i], self.num_scheduled_tokens[i], self.num_samples[i]))
            ints.append(len(self.appended_tokens[i]))
            ints.extend(self.appended_tokens[i])
            ints.extend((self.block_starts[i], len(self.block_tails[i])))
            ints.extend(self.block_tails[i])
        return struct.pack("<I", len(header)) + header + ints.tobytes()

    @classmethod
    def decode(cls, data: bytes) -> "StepPlan":
        (header_len,) = struct.unpack_from("<I", data)
        plan = cls()
        if header_len:
            for seq_id, tokens, num_prompt, table, params, seed, index in json.loads(data[4 : 4 + header_len]):
                if params.get("logit_bias"):  # JSON object keys are strings
                    params["logit_bias"] = {int(k): v for k, v in params["logit_bias"].items()}
                plan.new_sequences.append(
                    NewSequence(seq_id, tokens, num_prompt, table, SamplingParams(**params), seed, index)
                )
        ints = array("i")
        ints.frombytes(data[4 + header_len :])
        ints = ints.tolist()  # slices of a list, not element by element: a 256-sequence plan decodes in ~0.2 ms
        pos = 0

        def take(n: int) -> list[int]:
            nonlocal pos
            pos += n
            return ints[pos - n : pos]

        (has_bitmask, n) = take(2)
        plan.has_bitmask = bool(has_bitmask)
        plan.dropped_seq_ids = take(n)
        (n,) = take(1)
        copies = take(2 * n)
        plan.block_copies = list(zip(copies[::2], copies[1::2]))
        (n,) = take(1)
        for _ in range(n):
            seq_id, computed, scheduled, samples, num_appended = take(5)
            plan.seq_ids.append(seq_id)
            plan.num_computed_tokens.append(computed)
            plan.num_scheduled_tokens.append(scheduled)
            plan.num_samples.append(samples)
            plan.appended_tokens.append(take(num_appended))
            start, num_tail = take(2)
            plan.block_starts.append(start)
            plan.block_tails.append(take(num_tail))
        return plan


def _params_json(params: SamplingParams) -> dict:
    """The params as the workers need them: without the structured-output constraint, which only
    the engine's matchers read (a schema can be large, and the plan's size is bounded)."""
    fields = dataclasses.asdict(params)
    del fields["structured_outputs"]
    return fields


@dataclass
class StepBitmask:
    """The allowed tokens of the constrained sequences sampling in one step: row r of `words`
    ([k, ceil(V / 32)] int32; bit j % 32 of word j // 32 allows token j) is `seq_ids[r]`'s. A
    forking sequence's row serves all its samples (they start from the same grammar state)."""

    seq_ids: list[int]
    words: np.ndarray

    def encode(self) -> bytes:
        k, w = self.words.shape
        return struct.pack("<II", k, w) + array("i", self.seq_ids).tobytes() + self.words.astype("<i4").tobytes()

    @classmethod
    def decode(cls, data: bytes) -> "StepBitmask":
        k, w = struct.unpack_from("<II", data)
        ids = array("i")
        ids.frombytes(data[8 : 8 + 4 * k])
        words = np.frombuffer(data, dtype="<i4", offset=8 + 4 * k, count=k * w).reshape(k, w)
        return cls(ids.tolist(), words)
