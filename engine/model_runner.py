"""`ModelRunner`: one rank's side of a step: apply the plan, run its pipeline stage, and on the
driver (the last stage's first tensor-parallel rank) sample.

Every rank keeps the state of the sequences it has been told about (tokens, block table,
sampling settings) and updates it from each plan's deltas, so a decode step ships only the
newly sampled token and any new block of each sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from tpserve.engine.cuda_graph import CUDAGraphRunner
from tpserve.engine.protocol import NewSequence, Sample, StepBitmask, StepPlan, StepResult
from tpserve.engine.sampler import Sampler, SamplingBatch
from tpserve.engine.sampling_params import SamplingParams
from tpserve.model.gpt_model import GPTModel
from tpserve.model.inference_params import InferenceParams
from tpserve.model.kv_cache import KVCache
from tpserve.model.packed_seq_params import PackedSeqParams
from tpserve.model.parallel_state import ParallelState
from tpserve.model.pipeline_parallel import forward_step


@dataclass
class SequenceState:
    """What this rank knows of one sequence: what the plan that introduced it said, kept up to
    date with every later plan's deltas (tokens appended, block table tail). The rank's own
    object: the plan's `NewSequence` is the wire format and is never mutated."""

    token_ids: list[int]
    num_prompt_tokens: int
    block_table: list[int]
    params: SamplingParams
    seed: int
    sample_index: int

    @classmethod
    def from_plan(cls, new: NewSequence) -> SequenceState:
        return cls(list(new.token_ids), new.num_prompt_tokens, list(new.block_table), new.params, new.seed,
                   new.sample_index)


class ModelRunner:
    def __init__(
        self,
        model: GPTModel,
        kv_cache: KVCache,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_blocks_per_seq: int,
        eos_token_ids: list[int],
        parallel_state: ParallelState,
        device: torch.device,
        cuda_graph_batch_sizes: list[int] = (),
    ) -> None:
        """`cuda_graph_batch_sizes`: decode batch sizes to capture as CUDA graphs (empty: eager)."""
        self.model = model
        self.kv_cache = kv_cache
        self.parallel_state = parallel_state
        self.is_driver = parallel_state.is_pipeline_last_stage and parallel_state.tensor_model_parallel_rank == 0
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.vocab_size = model.unpadded_vocab_size
        self.sequences: dict[int, SequenceState] = {}
        self.inference_params = InferenceParams(
            max_num_seqs,  # the scheduler never runs more (admission counts a request's forks)
            max_num_batched_tokens,
            max_blocks_per_seq,
            kv_cache.block_size,
            device,
        )
        self.sampler = Sampler()
        self.graphs = None
        if cuda_graph_batch_sizes:
            self.graphs = CUDAGraphRunner(
                model, self.inference_params, cuda_graph_batch_sizes, max_blocks_per_seq * kv_cache.block_size, device
            )
            self.graphs.capture()

    def _apply(self, plan: StepPlan) -> None:
        for seq_id in plan.dropped_seq_ids:
            del self.sequences[seq_id]
        for new in plan.new_sequences:
            self.sequences[new.seq_id] = SequenceState.from_plan(new)
        for seq_id, tokens, start, tail in zip(plan.seq_ids, plan.appended_tokens, plan.block_starts, plan.block_tails):
            state = self.sequences[seq_id]
            state.token_ids.extend(tokens)
            state.block_table[start:] = tail
        if plan.block_copies:
            src = torch.tensor([s for s, _ in plan.block_copies], device=self.device)
            dst = torch.tensor([d for _, d in plan.block_copies], device=self.device)
            # [layers, 2, num_blocks, block_size, g, d]: copy whole blocks, every layer, K and V
            self.kv_cache.buffer[:, :, dst] = self.kv_cache.buffer[:, :, src]

    @torch.inference_mode()
    def execute(self, plan: StepPlan, read_bitmask: Callable[[], StepBitmask] | None = None) -> StepResult | None:
        """Run one step. `read_bitmask` gives the step's structured-output bitmasks, which the
        driver reads after the forward (the engine computes them meanwhile) when the plan says
        one follows."""
        self._apply(plan)
        if not plan.seq_ids:
            return StepResult() if self.is_driver else None
        ids: list[int] = []
        query_lens, context_lens, tables = [], [], []
        prompt_rows: list[tuple[int, int, int]] = []  # (seq_id, position, packed row)
        sample_rows: list[tuple[int, int, int]] = []  # (seq_id, num_samples, packed row)
        for seq_id, start, num_new, num_samples in zip(
            plan.seq_ids, plan.num_computed_tokens, plan.num_scheduled_tokens, plan.num_samples
        ):
            state = self.sequences[seq_id]
            offset = len(ids)
            ids.extend(state.token_ids[start : start + num_new])
            query_lens.append(num_new)
            context_lens.append(start + num_new)
            tables.append(state.block_table)
            if state.params.prompt_logprobs is not None:
                # Row p gives the distribution of the token at p + 1; a prompt token's logprob
                # needs the row before it. The first prompt token has none.
                for pos in range(start, min(start + num_new, state.num_prompt_tokens - 1)):
                    prompt_rows.append((seq_id, pos, offset + pos - start))
            if num_samples:
                sample_rows.append((seq_id, num_samples, offset + num_new - 1))
        logits_indices = [r for _, _, r in prompt_rows] + [r for _, _, r in sample_rows]
        positions = self.inference_params.prepare(query_lens, context_lens, tables, logits_indices)
        if self.graphs is not None and self.graphs.can_run(len(query_lens), max(query_lens)):
            logits = self.graphs.run(ids, positions)
        else:
            logits = forward_step(
                self.model,
                torch.tensor(ids, device=self.device),
                positions,
                self.parallel_state,
                inference_params=self.inference_params,
                packed_seq_params=PackedSeqParams.from_lengths(query_lens, self.device),
            )  # [len(logits_indices), V] on every rank of the last stage (gathered), else None
        if not self.is_driver:
            return None
        result = StepResult()
        if prompt_rows:
            self._prompt_logprobs(logits[: len(prompt_rows)].float(), prompt_rows, result)
        if sample_rows:
            bitmask = read_bitmask() if plan.has_bitmask else None
            self._sample(logits[len(prompt_rows) :], sample_rows, result, bitmask)
        return result

    def _sample(self, logits: torch.Tensor, rows: list[tuple[int, int, int]], result: StepResult,
                bitmask: StepBitmask | None) -> None:
        """One sampler row per sample: a forking sequence's last row (and bitmask) is repeated n times."""
        allowed = dict(zip(bitmask.seq_ids, bitmask.words)) if bitmask is not None else {}
        repeat, inputs = [], []
        for seq_id, num_samples, _ in rows:
            state = self.sequences[seq_id]
            n_prompt = state.num_prompt_tokens
            # Copies of the prompt and output grow with the sequence: made only for a penalty.
            history = state.params.penalizes_history
            prompt, output = (state.token_ids[:n_prompt], state.token_ids[n_prompt:]) if history else ((), ())
            for k in range(num_samples):
                index = state.sample_index if num_samples == 1 else k
                inputs.append((state.params, prompt, output, state.seed, index, len(state.token_ids) - n_prompt,
                               allowed.get(seq_id)))
            repeat.append(num_samples)
        if any(r != 1 for r in repeat):  # a fork: its row is repeated n times
            logits = logits.repeat_interleave(torch.tensor(repeat, device=logits.device), dim=0)  # [samples, V]
        batch = SamplingBatch.build(inputs, self.vocab_size, self.eos_token_ids, logits.device)
        out = self.sampler(logits, batch)
        token_ids = out.token_ids.tolist()
        logprobs = out.logprobs.tolist() if out.logprobs is not None else [None] * len(token_ids)
        top_ids = out.top_logprob_ids.tolist() if out.top_logprob_ids is not None else None
        top_values = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        i = 0
        for seq_id, num_samples, _ in rows:
            params = self.sequences[seq_id].params
            samples = []
            for _ in range(num_samples):
                n_top = params.logprobs or 0
                top = list(zip(top_ids[i][:n_top], top_values[i][:n_top])) if n_top and top_ids else []
                samples.append(Sample(token_ids[i], logprobs[i], top))
                i += 1
            result.samples[seq_id] = samples

    def _prompt_logprobs(self, logits: torch.Tensor, rows: list[tuple[int, int, int]], result: StepResult) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)  # [rows, V]
        targets = torch.tensor(
            [self.sequences[seq_id].token_ids[pos + 1] for seq_id, pos, _ in rows], device=logprobs.device
        )
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        max_top = max(self.sequences[seq_id].params.prompt_logprobs for seq_id, _, _ in rows)
        top_values, top_ids = (logprobs.topk(max_top, dim=-1) if max_top else (None, None))
        for i, (seq_id, pos, _) in enumerate(rows):
            n_top = self.sequences[seq_id].params.prompt_logprobs
            top = list(zip(top_ids[i, :n_top].tolist(), top_values[i, :n_top].tolist())) if n_top else []
            result.prompt_logprobs.setdefault(seq_id, []).append((pos + 1, Sample(int(targets[i]), chosen[i], top)))
