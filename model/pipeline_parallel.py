"""One forward through the pipeline: each stage receives the previous stage's hidden states,
runs its layers and sends them on; the last stage computes the logits.

Every rank knows the step (the token ids, positions and cache layout), so a receiver knows the
packed `[t, h]` shape it waits for and only the hidden states travel, by point-to-point send and
recv between the same tensor-parallel rank of neighbouring stages (Megatron's p2p pattern).
Logits never cross the pipeline.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tpserve.model.gpt_model import GPTModel
from tpserve.model.parallel_state import ParallelState


def recv_forward(num_tokens: int, model: GPTModel, device: torch.device, ps: ParallelState) -> torch.Tensor:
    hidden = torch.empty(num_tokens, model.config.hidden_size, dtype=model.config.params_dtype, device=device)
    dist.recv(hidden, src=ps.pipeline_model_parallel_prev_rank)
    return hidden


def send_forward(hidden_states: torch.Tensor, ps: ParallelState) -> None:
    dist.send(hidden_states.contiguous(), dst=ps.pipeline_model_parallel_next_rank)


def forward_step(model: GPTModel, input_ids: torch.Tensor, position_ids: torch.Tensor, ps: ParallelState,
                 **kwargs) -> torch.Tensor | None:
    """`model(input_ids, position_ids, **kwargs)` across the pipeline: the logits on the last
    stage, None on the others. Every stage's ranks call it with the same step."""
    decoder_input = None
    if not ps.is_pipeline_first_stage:
        decoder_input = recv_forward(input_ids.numel(), model, input_ids.device, ps)
    out = model(input_ids, position_ids, decoder_input=decoder_input, **kwargs)
    if not ps.is_pipeline_last_stage:
        send_forward(out, ps)
        return None
    return out
