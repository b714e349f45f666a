"""The worker process: one per rank of TP × PP. Loads its shard of its pipeline stage, owns that
stage's KV cache, runs steps.

    start ─> join the group ─> load this rank's slices ─> measure memory ─> send READY(num_blocks)
          <─ INIT_CACHE(num_blocks, the minimum over ranks) ─> allocate the cache ─> send READY
          <─ STEP(plan bytes) ... (the driver, the last stage's first TP rank, answers each with
                                   the sampled tokens; when the plan says so, it reads a
                                   BITMASK(bytes) after the forward, before sampling)
          <─ SHUTDOWN
An exception is sent to the executor as text before the process exits.
"""

from __future__ import annotations

import os
import signal
import traceback

import torch
import torch.distributed as dist

from tpserve.engine.cuda_graph import cuda_graph_batch_sizes
from tpserve.engine.model_runner import ModelRunner
from tpserve.engine.protocol import StepBitmask, StepPlan, WorkerCommand, WorkerConfig
from tpserve.kernels.cpu_linear import LinearKernels
from tpserve.kernels.cpu_tuning import tune_linears
from tpserve.model.checkpoint import load_model
from tpserve.model.gpt_model import GPTModel
from tpserve.model.kv_cache import KVCache
from tpserve.model.parallel_state import ParallelState, initialize_model_parallel
from tpserve.model.pipeline_parallel import forward_step

# How long the first start on a machine may spend timing the CPU linear kernels; entries it
# does not reach (the largest token counts come last) are timed by later starts.
CPU_TUNING_SECONDS = 10.0


def _available_cpu_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


def kv_cache_bytes(config: WorkerConfig, model: GPTModel, device: torch.device, ps: ParallelState) -> int:
    """Bytes this rank gives its KV cache: the setting, or what measured free memory allows."""
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    if device.type == "cuda":
        # What the card may hold in all, less what is in use now (weights, the CUDA context),
        # less the activations of the largest step, measured by running one.
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        peak_activations = _profile_activations(config, model, device, ps)
        return int(total * config.gpu_memory_utilization - (total - free) - peak_activations)
    # Ranks share the host's memory: each takes its part of a quarter of what is available.
    return min(_available_cpu_memory() // 4 // config.world_size, 4 << 30)


def _profile_activations(config: WorkerConfig, model: GPTModel, device: torch.device, ps: ParallelState) -> int:
    """Peak memory of a forward over max_num_batched_tokens tokens (no cache: a whole prompt)."""
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    tokens = min(config.max_num_batched_tokens, config.max_model_len)
    with torch.inference_mode():
        forward_step(model, torch.zeros(1, tokens, dtype=torch.long, device=device),
                     torch.arange(tokens, device=device)[None], ps)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def bind_cpu_linear_kernels(config: WorkerConfig, model: GPTModel, ps: ParallelState) -> tuple[str, str] | None:
    """Give every linear layer its kernels: pinned, or timed on this machine by rank 0 (cached).
    The others wait meanwhile: ranks timing at once on shared cores would each see the others'
    load. Rank 0 times the shapes of every rank (pipeline stages differ: only the last has the
    output layer). Returns rank 0's (summary, table) of the timing, for the engine to log."""
    shapes = model.cpu_linear_shapes(config.max_num_batched_tokens, config.max_num_seqs)
    if config.cpu_kernels != "auto":
        pinned = LinearKernels.pinned(config.cpu_kernels)
        model.bind_cpu_linear_kernels({(s.n, s.k): pinned for s in shapes})
        return None
    choices, report = None, None
    if ps.world_size > 1:
        every_rank = [None] * ps.world_size
        dist.all_gather_object(every_rank, shapes)
        shapes = sorted({shape for rank_shapes in every_rank for shape in rank_shapes},
                        key=lambda s: (s.n, s.k, s.max_tokens))
    if ps.rank == 0:
        result = tune_linears(shapes, config.dtype, time_box=CPU_TUNING_SECONDS)
        choices = {shape: kernels.choices for shape, kernels in result.kernels.items()}
        report = (result.summary(), result.table())
    if ps.world_size > 1:
        box = [choices]
        dist.broadcast_object_list(box, src=0)
        choices = box[0]
    model.bind_cpu_linear_kernels({shape: LinearKernels(c) for shape, c in choices.items()})
    return report


def worker_main(rank: int, config: WorkerConfig, conn) -> None:
    # The server process owns shutdown. A Ctrl-C reaches the whole process group, and a rank
    # killed by it would fail the requests the server is still draining; a worker stops on
    # SHUTDOWN, on the executor's SIGTERM/SIGKILL, or on EOF once the server process is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _serve(rank, config, conn)
    except BaseException:
        try:
            conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
        finally:
            os._exit(1)  # peers may be blocked in a collective; the executor ends them


def _serve(rank: int, config: WorkerConfig, conn) -> None:
    if config.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        # The host's cores are shared by the ranks (2 // tp on a 2-core machine, at least 1),
        # unless OMP_NUM_THREADS, torch's own knob, says otherwise: on a shared host, fewer
        # threads than cores avoid OpenMP waiting on a core another process holds.
        threads = os.environ.get("OMP_NUM_THREADS")
        torch.set_num_threads(int(threads) if threads else max(1, (os.cpu_count() or 1) // config.world_size))
        backend = "gloo"
    ps = initialize_model_parallel(rank, config.tensor_parallel_size, config.pipeline_parallel_size,
                                   config.init_method, backend)
    model = load_model(config.checkpoint, ps, device=device, dtype=config.dtype, parallel_output=False,
                       random_weights=config.random_weights)
    tuning = bind_cpu_linear_kernels(config, model, ps) if device.type == "cpu" else None
    bytes_per_block = KVCache.bytes_per_block(model.config, config.block_size, config.dtype, model.num_local_layers)
    conn.send(("ready", (kv_cache_bytes(config, model, device, ps) // bytes_per_block, tuning)))

    command, num_blocks = conn.recv()
    if command == WorkerCommand.SHUTDOWN:  # the engine refused to start (e.g. too few blocks)
        return
    assert command == WorkerCommand.INIT_CACHE, command
    kv_cache = KVCache(model.config, num_blocks, config.block_size, config.dtype, device, model.num_local_layers)
    model.bind_kv_cache(kv_cache)
    runner = ModelRunner(
        model,
        kv_cache,
        config.max_num_seqs,
        config.max_num_batched_tokens,
        max_blocks_per_seq=-(-config.max_model_len // config.block_size),
        eos_token_ids=config.eos_token_ids,
        parallel_state=ps,
        device=device,
        # A decode batch is at most max_num_seqs sequences and max_num_batched_tokens tokens.
        # A graph holds one stage's forward, not its sends and receives: pipelines run eagerly.
        cuda_graph_batch_sizes=(
            cuda_graph_batch_sizes(min(config.max_num_seqs, config.max_num_batched_tokens))
            if device.type == "cuda" and not config.enforce_eager and config.pipeline_parallel_size == 1 else []
        ),
    )
    conn.send(("ready", None))

    def read_bitmask() -> StepBitmask:
        command, payload = conn.recv()
        assert command == WorkerCommand.BITMASK, command
        return StepBitmask.decode(payload)

    while True:
        command, payload = conn.recv()
        if command == WorkerCommand.SHUTDOWN:
            break
        result = runner.execute(StepPlan.decode(payload), read_bitmask)
        if runner.is_driver:
            conn.send(("ok", result))
