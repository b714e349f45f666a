"""`LLMEngine`: requests in, steps out. Synchronous; `AsyncLLMEngine` runs it on a thread.

One step: schedule -> build the plan -> every rank runs it, rank 0 samples -> append the
tokens, detokenize, check stops, fork n > 1 samples, free what finished.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

from transformers import AutoTokenizer

from tpserve.engine.block_manager import BlockManager
from tpserve.engine.config import EngineConfig
from tpserve.engine.cuda_graph import cuda_graph_batch_sizes
from tpserve.engine.executor import Executor
from tpserve.engine.model_runner import StepResult
from tpserve.engine.outputs import RequestOutput
from tpserve.engine.request import Request
from tpserve.engine.sampling_params import SamplingParams
from tpserve.engine.scheduler import ScheduledSequence, Scheduler
from tpserve.engine.sequence import FinishReason, Sequence
from tpserve.engine.step_plan import NewSequence, StepPlan
from tpserve.engine.worker import WorkerConfig
from tpserve.model.checkpoint import read_checkpoint_info
from tpserve.model.checkpoint.loader import at_tensor_parallel_size

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
        at_tensor_parallel_size(info.config, config.tensor_parallel_size, config.checkpoint)
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
        self.executor = Executor(
            WorkerConfig(
                checkpoint=config.checkpoint,
                world_size=config.tensor_parallel_size,
                init_method="",  # the executor picks a free port
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
                cpu_kernels=config.cpu_kernels,
                # A decode batch is at most max_num_seqs sequences and max_num_batched_tokens tokens.
                cuda_graph_batch_sizes=(
                    cuda_graph_batch_sizes(min(config.max_num_seqs, config.max_num_batched_tokens))
                    if config.device == "cuda" and not config.enforce_eager else []
                ),
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

    # --- requests ---
    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Check a request before it is queued; its prompt token ids. Raises ValueError (a bad
        request), never lets bad input reach the workers. Safe to call from any thread."""
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}")
        params.check_token_ids(self.vocab_size)
        return self.tokenize(prompt)

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
        self, request_id: str, prompt: str | list[int], params: SamplingParams, prompt_token_ids: list[int] | None = None
    ) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        token_ids = prompt_token_ids if prompt_token_ids is not None else self.validate(prompt, params)
        # Every request gets a seed, so its randomness is stateless (the same tokens in any batch).
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        request = Request(
            request_id, prompt if isinstance(prompt, str) else None, token_ids, params, seed, self.tokenizer,
            self.eos_token_ids, self.max_model_len,
        )
        self.requests[request_id] = request
        self.scheduler.add(request.seqs[0])

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                request.finish(seq, FinishReason.ABORT)
                self.scheduler.finish(seq)
        return request.output()

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
    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """Run one step; the outputs of the requests that moved (cumulative, finished ones last),
        or of those that finished only (offline generation: an output copies every token so far)."""
        self.executor.check()
        start = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        plan = self._plan(scheduled)
        sent = time.perf_counter()
        result = self.executor.execute(plan)
        returned = time.perf_counter()
        outputs = self._update(scheduled, result, only_finished)
        end = time.perf_counter()
        self.step_times.num_steps += 1
        self.step_times.engine_s += (sent - start) + (end - returned)
        self.step_times.total_s += end - start
        return outputs

    def _plan(self, scheduled: list[ScheduledSequence]) -> StepPlan:
        plan = StepPlan(dropped_seq_ids=self.scheduler.dropped_seq_ids, block_copies=self.block_manager.pending_copies)
        self.scheduler.dropped_seq_ids, self.block_manager.pending_copies = [], []
        for item in scheduled:
            seq = item.seq
            if seq.needs_full_send:
                plan.new_sequences.append(
                    NewSequence(seq.seq_id, list(seq.token_ids), seq.num_prompt_tokens, list(seq.block_table),
                                seq.params, seq.seed, seq.sample_index)
                )
                seq.needs_full_send = False
                appended, start = [], len(seq.block_table)
            else:
                appended = seq.tokens(seq.num_tokens - seq.num_unsent_tokens, seq.num_tokens)
                # Only the last block sent can have changed (a copy on write replaces it).
                start = seq.num_sent_blocks
                if start and seq.block_table[start - 1] != seq.last_sent_block:
                    start -= 1
            seq.num_unsent_tokens = 0
            seq.num_sent_blocks, seq.last_sent_block = len(seq.block_table), seq.block_table[-1]
            reaches_end = seq.num_computed_tokens + item.num_new_tokens == seq.num_tokens
            plan.seq_ids.append(seq.seq_id)
            plan.num_computed_tokens.append(seq.num_computed_tokens)
            plan.num_scheduled_tokens.append(item.num_new_tokens)
            plan.num_samples.append(1 + seq.num_pending_forks if reaches_end else 0)
            plan.appended_tokens.append(appended)
            plan.block_starts.append(start)
            plan.block_tails.append(seq.block_table[start:])
        return plan

    def _update(self, scheduled: list[ScheduledSequence], result: StepResult, only_finished: bool) -> list[RequestOutput]:
        moved: dict[str, Request] = {}
        for item in scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            request = self.requests[seq.request_id]
            if seq.seq_id in result.prompt_logprobs:
                request.add_prompt_logprobs(result.prompt_logprobs[seq.seq_id])
            samples = result.samples.get(seq.seq_id)
            if not samples:
                continue
            moved[request.request_id] = request
            if len(samples) > 1:  # the prompt is done: the other samples fork from here
                for child, sample in zip(request.pending_forks, samples[1:]):
                    self.block_manager.fork(seq, child)
                    self.scheduler.add_running(child)
                    self._on_token(request, child, sample)
                seq.num_pending_forks = 0
            self._on_token(request, seq, samples[0])
        outputs = []
        for request in moved.values():
            if request.finished:
                del self.requests[request.request_id]
            elif only_finished:
                continue
            outputs.append(request.output())
        return outputs

    def _on_token(self, request: Request, seq: Sequence, sample) -> None:
        reason = request.on_token(seq, sample)
        if reason is not None:
            request.finish(seq, reason)
            self.scheduler.finish(seq)

    def shutdown(self) -> None:
        self.executor.shutdown()
