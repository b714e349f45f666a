"""`LLMEngine`: requests in, steps out. Synchronous; `AsyncLLMEngine` runs it on a thread.

One step: the scheduler schedules and builds the plan -> every rank runs it, the driver samples ->
the scheduler takes the result back (appends the tokens, forks n > 1 samples) -> the engine
detokenizes, checks stops, finishes what stopped, and returns each moved request's delta.
"""

from __future__ import annotations

import gc
import logging
import random
import time
from dataclasses import dataclass

from transformers import AutoTokenizer

from tpserve.engine.block_manager import BlockManager
from tpserve.engine.config import EngineConfig
from tpserve.engine.executor import Executor
from tpserve.engine.grammar import BitmaskFiller, CompiledGrammar, GrammarCompiler
from tpserve.engine.outputs import CompletionOutput, RequestOutput
from tpserve.engine.protocol import StepBitmask, StepResult, WorkerConfig
from tpserve.engine.request import Request
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.scheduler import Scheduler, SchedulerOutput
from tpserve.model.checkpoint.format import at_parallel_sizes, read_checkpoint_info

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks held by sequences
    num_preemptions: int
    num_prefix_cache_hit_blocks: int


@dataclass
class StepTimes:
    """Wall time of the steps run so far: all of it, and the engine's own share (scheduling,
    building the plan, applying the results: appending, detokenizing, stops), which the workers
    wait on. The rest is the executor's: sending the plan, the ranks' step, the answer."""

    num_steps: int = 0
    engine_s: float = 0.0
    total_s: float = 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        info = read_checkpoint_info(config.checkpoint, require_weights=config.load_format == "auto")
        if not info.has_tokenizer:
            raise ValueError(f"{config.checkpoint} has no tokenizer files; the engine needs one to serve text")
        # Here rather than in the workers, whose errors come back as a rank's traceback.
        at_parallel_sizes(info.config, config.tensor_parallel_size, config.pipeline_parallel_size, config.checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(str(config.checkpoint))
        self.vocab_size = info.config.vocab_size
        self.chat_template = info.tokenizer.chat_template
        model_len = info.config.seq_length
        self.max_model_len = config.max_model_len or model_len
        if self.max_model_len > model_len:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's seq_length={model_len}")
        eos = set(info.tokenizer.eos_token_ids or ())
        if info.tokenizer.eos_token_id is not None:
            eos.add(info.tokenizer.eos_token_id)
        self.eos_token_ids = eos
        # Structured outputs: grammars compiled on their own threads (the tokenizer's tables are
        # built on the first), masks filled on llguidance's.
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, sorted(eos))
        self.bitmasks = BitmaskFiller(self.vocab_size)
        self.executor = Executor(
            WorkerConfig(
                checkpoint=config.checkpoint,
                tensor_parallel_size=config.tensor_parallel_size,
                pipeline_parallel_size=config.pipeline_parallel_size,
                # torchrun's rendezvous, or a free port the executor picks
                init_method="env://" if config.launcher == "torchrun" else "",
                device=config.device,
                dtype=config.dtype,
                block_size=config.block_size,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                kv_cache_memory=config.kv_cache_memory,
                gpu_memory_utilization=config.gpu_memory_utilization,
                eos_token_ids=sorted(eos),
                random_weights=config.load_format == "dummy",
                enforce_eager=config.enforce_eager,
                cpu_kernels=config.cpu_kernels,
                distributed_timeout=config.distributed_timeout,
            ),
            step_timeout=config.step_timeout,
        )
        if self.executor.cpu_kernel_tuning is not None:
            summary, table = self.executor.cpu_kernel_tuning
            logger.info("%s", summary)
            logger.debug("CPU linear kernels, median microseconds per call:\n%s", table)
        try:
            num_blocks = self.executor.num_blocks
            needed = -(-self.max_model_len // config.block_size)
            if num_blocks < needed:
                raise ValueError(
                    f"the KV cache holds {num_blocks * config.block_size} tokens ({num_blocks} blocks of "
                    f"{config.block_size}), less than one sequence of max_model_len={self.max_model_len} tokens; "
                    f"give it more memory or lower max_model_len"
                )
            self.executor.init_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self.step_times = StepTimes()
        logger.info("KV cache: %d blocks of %d tokens", num_blocks, config.block_size)
        # What is alive now lives as long as the engine: the tokenizer's vocabulary, the modules of
        # torch and transformers, some 200k objects. Frozen out of the cyclic collector's reach, the
        # full collections that every step's short-lived outputs trigger do not walk them each time
        # (vLLM freezes its heap after start-up too; the README gives the time it saves per step).
        gc.collect()
        gc.freeze()

    # --- requests ---
    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Check a request before it is queued; its prompt token ids. Raises ValueError (a bad
        request), never lets bad input reach the workers. Safe to call from any thread."""
        self.check_params(params)
        return self.tokenize(prompt)

    def check_params(self, params: SamplingParams) -> None:
        """ValueError for settings the engine cannot run: n over max_num_seqs, token ids outside
        the vocabulary. Safe to call from any thread."""
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        params.check_token_ids(self.vocab_size)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids, checked. Safe to call from another thread than the engine's."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            token_ids = self.tokenizer(prompt)["input_ids"]
        else:
            token_ids = list(prompt)
            if not token_ids:
                raise ValueError("the prompt is empty")
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, and max_model_len is {self.max_model_len}: "
                f"no room is left to generate"
            )
        return token_ids

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, prompt_token_ids: list[int] | None = None,
        grammar: CompiledGrammar | None = None,
    ) -> None:
        """`grammar`: params.structured_outputs compiled (`grammars.compile_async` off this thread);
        None compiles it here, waiting (ValueError when it cannot be compiled)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        token_ids = prompt_token_ids if prompt_token_ids is not None else self.validate(prompt, params)
        if params.structured_outputs is not None and grammar is None:
            grammar = self.grammars.compile(params.structured_outputs)
        # Every request gets a seed, so its randomness is stateless (the same tokens in any batch).
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        request = Request(
            request_id, prompt if isinstance(prompt, str) else None, token_ids, params, seed, self.tokenizer,
            self.eos_token_ids, self.max_model_len, grammar,
        )
        self.requests[request_id] = request
        self.scheduler.add(request.seqs[0])

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request; its last delta (finish_reason "abort" for every sample still running),
        or None when it is not running."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        stopped, deltas = request.abort()
        for seq in stopped:
            self.scheduler.finish(seq)
        return request.output(deltas)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.block_manager.usage,
            num_preemptions=self.scheduler.num_preemptions,
            num_prefix_cache_hit_blocks=self.block_manager.num_prefix_hits,
        )

    # --- steps ---
    def step(self) -> list[RequestOutput]:
        """Run one step; the deltas of the requests that moved (see `outputs`), a request's
        last one with finished=True."""
        self.executor.check()
        start = time.perf_counter()
        output = self.scheduler.schedule()
        if not output.scheduled:
            return []
        sent = time.perf_counter()
        constrained = self._constrained(output)
        output.plan.has_bitmask = bool(constrained)
        result = self.executor.execute(output.plan, lambda: self._bitmask(constrained))
        returned = time.perf_counter()
        outputs = self._process(output, result)
        end = time.perf_counter()
        self.step_times.num_steps += 1
        self.step_times.engine_s += (sent - start) + (end - returned)
        self.step_times.total_s += end - start
        return outputs

    def _constrained(self, output: SchedulerOutput) -> list[tuple[int, object]]:
        """(seq_id, grammar matcher) of each constrained sequence that samples in this step."""
        found = []
        for item in output.scheduled:
            if item.num_samples:
                matcher = self.requests[item.seq.request_id].matcher(item.seq.sample_index)
                if matcher is not None:
                    found.append((item.seq.seq_id, matcher))
        return found

    def _bitmask(self, constrained: list[tuple[int, object]]) -> StepBitmask:
        return StepBitmask([seq_id for seq_id, _ in constrained], self.bitmasks.fill([m for _, m in constrained]))

    def _process(self, output: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        if result.prompt_logprobs:
            for item in output.scheduled:
                entries = result.prompt_logprobs.get(item.seq.seq_id)
                if entries and not item.seq.is_finished:
                    self.requests[item.seq.request_id].add_prompt_logprobs(entries)
        moved: dict[str, tuple[Request, list[CompletionOutput]]] = {}
        for seq, sample in self.scheduler.update_from_output(output, result):
            request = self.requests[seq.request_id]
            delta = request.on_token(seq, sample)
            if delta.finish_reason is not None:
                self.scheduler.finish(seq)
            entry = moved.get(request.request_id)
            if entry is None:
                moved[request.request_id] = (request, [delta])
            else:
                entry[1].append(delta)
        outputs = []
        for request, deltas in moved.values():
            if request.finished:
                del self.requests[request.request_id]
            outputs.append(request.output(deltas))
        return outputs

    def shutdown(self) -> None:
        self.grammars.shutdown()
        self.executor.shutdown()
