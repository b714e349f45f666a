"""The worker process: one per rank of TP × PP. Loads its shard of its pipeline stage, owns that
stage's KV cache, runs steps.

    start ─> join the group ─> (rank 0's WorkerConfig to all) ─> load this rank's slices ─>
          measure memory ─> rank 0 sends READY(the fewest blocks any rank can hold)
          <─ INIT_CACHE(num_blocks) ─> allocate the cache ─> rank 0 sends READY
          <─ STEP(plan bytes) ... rank 0 answers each with the driver's sampled tokens; when the
             plan says so, a BITMASK(bytes) follows it, which the driver reads after its forward,
             before sampling (from the pipe when it is rank 0, else passed on by rank 0)
          <─ SHUTDOWN
Only rank 0 talks to the engine (a pipe); every command reaches the others by broadcast
(engine/control_plane.py), so a rank on another node, started by torchrun, runs the same loop as
one the engine spawned. A spawned rank's exception goes to the executor as text before the process
exits; a headless rank prints it and exits non-zero, for torchrun to see.
"""

from __future__ import annotations

import os
import signal
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tpserve.engine.control_plane import ControlPlane
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


def kv_cache_bytes(config: WorkerConfig, model: GPTModel, device: torch.device, ps: ParallelState,
                   local_world_size: int) -> int:
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
    # This machine's ranks share its memory: each takes its part of a quarter of what is available.
    return min(_available_cpu_memory() // 4 // local_world_size, 4 << 30)


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


@dataclass(frozen=True)
class RankStart:
    """What a rank knows before it joins the group."""

    rank: int
    world_size: int
    local_rank: int  # the GPU it drives
    local_world_size: int  # ranks on this machine, which share its cores and memory
    tensor_parallel_size: int
    pipeline_parallel_size: int
    device: str
    init_method: str  # tcp://host:port, or env:// under torchrun (MASTER_ADDR, MASTER_PORT)
    timeout: timedelta

    @classmethod
    def spawned(cls, rank: int, config: WorkerConfig) -> "RankStart":
        """A rank the executor spawned: everything comes from the WorkerConfig. Under torchrun the
        executor spawns rank 0 only, and the machine's layout is torchrun's."""
        local_rank, local_world_size = rank, config.world_size
        if config.init_method == "env://":
            local_rank, local_world_size = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
        return cls(rank, config.world_size, local_rank, local_world_size, config.tensor_parallel_size,
                   config.pipeline_parallel_size, config.device, config.init_method,
                   timedelta(seconds=config.distributed_timeout))


def _leave_shutdown_to_rank0() -> None:
    """The server process owns shutdown. A Ctrl-C reaches the whole process group, and so does a
    SIGTERM from torchrun, systemd or `docker stop`; a rank ended by it would fail the requests
    the server is still draining. A rank stops on rank 0's SHUTDOWN, on SIGKILL (the executor's,
    or torchrun's when its grace runs out), or when its pipe or its group's connections break."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_main(rank: int, config: WorkerConfig, conn) -> None:
    """A rank the executor spawned. `conn`: rank 0's two-way pipe to the engine; for the others,
    only the way their error reaches it."""
    _leave_shutdown_to_rank0()
    try:
        _serve(RankStart.spawned(rank, config), config, conn if rank == 0 else None)
    except BaseException as e:
        traceback.print_exc()  # the whole story goes to the log; the error's own line to the engine
        try:
            conn.send(("error", f"rank {rank}: {''.join(traceback.format_exception_only(e)).strip()}"))
        finally:
            os._exit(1)  # peers may be blocked in a collective; the executor ends them


def headless_main(start: RankStart) -> int:
    """A rank torchrun started that is not global rank 0: it waits for rank 0's commands, with no
    engine of its own. Returns the exit code: 0 after SHUTDOWN, 1 after an error."""
    _leave_shutdown_to_rank0()
    try:
        _serve(start, None, None)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _serve(start: RankStart, config: WorkerConfig | None, conn) -> None:
    """`config` and `conn`: the WorkerConfig and the engine's pipe on rank 0; None elsewhere."""
    if start.device == "cuda":
        device = torch.device("cuda", start.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        # The machine's cores are shared by its ranks (2 // tp on a 2-core machine, at least 1),
        # unless OMP_NUM_THREADS, torch's own knob, says otherwise: on a shared host, fewer
        # threads than cores avoid OpenMP waiting on a core another process holds.
        threads = os.environ.get("OMP_NUM_THREADS")
        torch.set_num_threads(int(threads) if threads else max(1, (os.cpu_count() or 1) // start.local_world_size))
        backend = "gloo"
    ps = initialize_model_parallel(start.rank, start.tensor_parallel_size, start.pipeline_parallel_size,
                                   start.init_method, backend, start.timeout)
    # The driver samples: the last stage's first tensor-parallel rank.
    driver_rank = ps.global_rank(0, ps.pipeline_model_parallel_size - 1)
    control = ControlPlane(ps.rank, ps.world_size, driver_rank, start.timeout)
    config = control.share(config)
    model = load_model(config.checkpoint, ps, device=device, dtype=config.dtype, parallel_output=False,
                       random_weights=config.random_weights)
    tuning = bind_cpu_linear_kernels(config, model, ps) if device.type == "cpu" else None
    bytes_per_block = KVCache.bytes_per_block(model.config, config.block_size, config.dtype, model.num_local_layers)
    num_blocks = kv_cache_bytes(config, model, device, ps, start.local_world_size) // bytes_per_block
    num_blocks = control.min_over_ranks(num_blocks)  # every rank must hold the same blocks
    if conn is not None:
        conn.send(("ready", (num_blocks, tuning)))

    runner = None
    while True:
        command, payload = control.next_command(conn)
        if command == WorkerCommand.SHUTDOWN:  # also before INIT_CACHE: the engine refused to start
            return
        if command == WorkerCommand.HEARTBEAT:
            continue
        if command == WorkerCommand.INIT_CACHE:
            runner = _runner(config, model, int(payload), ps, device)
            control.barrier()  # every rank has its cache
            if conn is not None:
                conn.send(("ready", None))
            continue
        assert command == WorkerCommand.STEP and runner is not None, command
        plan = StepPlan.decode(payload)
        result = runner.execute(plan, lambda: StepBitmask.decode(_bitmask_bytes(control, conn)))
        if plan.has_bitmask and conn is not None and not runner.is_driver:
            control.send_to_driver(_bitmask_bytes(control, conn))  # computed while the stages ran
        result = control.result_to_rank0(result)
        if conn is not None:
            conn.send(("ok", result))


def _bitmask_bytes(control: ControlPlane, conn) -> bytes:
    """The step's bitmask: from the engine's pipe on rank 0, from rank 0 on a driver elsewhere."""
    if conn is None:
        return control.receive_from_rank0()
    command, payload = conn.recv()
    assert command == WorkerCommand.BITMASK, command
    return payload


def _runner(config: WorkerConfig, model: GPTModel, num_blocks: int, ps: ParallelState,
            device: torch.device) -> ModelRunner:
    kv_cache = KVCache(model.config, num_blocks, config.block_size, config.dtype, device, model.num_local_layers)
    model.bind_kv_cache(kv_cache)
    return ModelRunner(
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
