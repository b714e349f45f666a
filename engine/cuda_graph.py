"""`CUDAGraphRunner`: decode steps replayed from CUDA graphs instead of launched op by op.

A decode step is a few hundred small kernels. Launched one by one from Python, at small batch
their launch cost exceeds their work, and the GPU waits on the host. So each batch size of a
ladder is captured once at start-up, over static buffers: a step of b sequences copies its
inputs into the buffers, pads to the next captured size (`InferenceParams.pad_decode`) and
replays that graph. Only decode steps (one new token per sequence) run here; prefill and mixed
steps keep eager launches, as their shapes vary too much to capture.

A graph freezes what the host decided while it was captured: buffer addresses, launch grids
and every host-side value the forward read. So the forward reads a step's metadata from the
`InferenceParams` buffers only, and capture sets `max_context_len` to the longest context the
engine serves: the decode kernel's split count, chosen from it, then covers every step (splits
past a sequence's end record nothing).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from tpserve.model.gpt_model import GPTModel
from tpserve.model.inference_params import InferenceParams
from tpserve.model.packed_seq_params import PackedSeqParams


def cuda_graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then each multiple of 8 below max_num_seqs, then max_num_seqs (vLLM's ladder):
    a step pads by at most 7 rows, or to the next power of two below 8."""
    return [s for s in (1, 2, 4, *range(8, max_num_seqs, 8)) if s < max_num_seqs] + [max_num_seqs]


def capture_graph(forward: Callable[[], None], pool) -> tuple[Callable[[], None], object]:
    """Capture `forward` into a CUDA graph that takes its memory from `pool` (None: a new pool);
    returns its replay and its pool, for the next capture to share. `forward` runs once first,
    on the capture's own stream, as torch asks: that compiles the Triton kernels and gives the
    stream its cuBLAS workspace outside the graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        forward()
    return graph.replay, graph.pool()


class CUDAGraphRunner:
    def __init__(
        self,
        model: GPTModel,
        inference_params: InferenceParams,
        batch_sizes: list[int],
        max_context_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.inference_params = inference_params
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_context_len = max_context_len
        largest = self.batch_sizes[-1]
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.cu_seqlens = torch.arange(largest + 1, dtype=torch.int32, device=device)  # one query each
        # Every graph's logits land here ([size, V] of it): one output for all sizes, where a
        # graph's own output would stay allocated in the pool (35 of them at 256 sequences).
        self.logits = torch.empty(largest, model.unpadded_vocab_size, dtype=model.config.params_dtype, device=device)
        self._replays: dict[int, Callable[[], None]] = {}

    def _forward(self, size: int) -> None:
        logits = self.model(
            self.input_ids[:size],
            self.positions[:size],
            inference_params=self.inference_params,
            packed_seq_params=PackedSeqParams(cu_seqlens_q=self.cu_seqlens[: size + 1], max_seqlen_q=1),
        )
        self.logits[:size].copy_(logits)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, so the smaller graphs reuse its memory pool. Run
        before any request: capture writes into no cache slot, but replaces the step metadata."""
        pool = None
        for size in reversed(self.batch_sizes):
            self.inference_params.pad_decode(0, size)
            self.inference_params.max_context_len = self.max_context_len
            self._replays[size], pool = capture_graph(functools.partial(self._forward, size), pool)

    def can_run(self, num_seqs: int, max_seqlen_q: int) -> bool:
        return max_seqlen_q == 1 and 0 < num_seqs <= self.batch_sizes[-1]

    def run(self, input_ids: list[int], positions: torch.Tensor) -> torch.Tensor:
        """The logits of a decode step already `prepare`d in the InferenceParams (one token per
        sequence): [len(logits_indices), V], a fresh tensor (the graph's output is reused)."""
        b = len(input_ids)
        size = next(s for s in self.batch_sizes if s >= b)
        rows = self.inference_params.logits_indices  # None: every row
        self.input_ids[:b].copy_(torch.tensor(input_ids, dtype=torch.int64))
        self.positions[:b].copy_(positions)
        self.inference_params.pad_decode(b, size)
        self._replays[size]()
        return self.logits[:b].clone() if rows is None else self.logits.index_select(0, rows)
