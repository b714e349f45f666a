"""`MoELayer`: a mixture of experts in place of the MLP, in Megatron-Core's names.

    router (fp32, replicated)  ->  top-k experts per token and their weights
    experts.local_experts.E    ->  an MLP each (linear_fc1 column-parallel, linear_fc2 row-parallel),
                                   run on the tokens routed to it
    shared_experts (optional)  ->  an MLP every token goes through, times sigmoid(gate) if gated
    one all-reduce             ->  of the weighted sum of the experts' partial outputs (and the
                                   shared expert's), as Megatron's expert tensor parallelism does

The router follows Megatron-Core's `topk_softmax_with_capacity`: softmax scores either over all
experts before the top-k (`moe_router_pre_softmax`, Qwen2-MoE's `norm_topk_prob=False`) or over
the k chosen logits after it (Mixtral); sigmoid scores (`moe_router_score_function="sigmoid"`)
are renormalised over the top k, and an expert bias, if any, steers the choice only. At
inference no token is ever dropped: every expert takes all the tokens routed to it.

Two ways to run the experts, the same numbers: `grouped` sorts the token slots by expert and
runs each expert on its own tokens (counts read on the host: the fastest on the CPU, where steps
run eagerly); `dense` runs every expert on every token and weights the outputs by the routing
weights, zero for experts not chosen, so a decode step has no host sync and can be captured in a
CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tpserve.model.config import TransformerConfig
from tpserve.model.mlp import MLP, MLPSubmodules
from tpserve.model.parallel_state import ParallelState
from tpserve.model.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


class TopKRouter(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_moe_experts, config.hidden_size, dtype=torch.float32),
                                   requires_grad=False)
        self.expert_bias = (
            nn.Parameter(torch.zeros(config.num_moe_experts, dtype=torch.float32), requires_grad=False)
            if config.moe_router_enable_expert_bias else None
        )

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [t, k] fp32, expert ids [t, k]) for each token."""
        c = self.config
        logits = F.linear(hidden_states.float(), self.weight)  # [t, E], fp32 as Megatron's router
        k = c.moe_router_topk
        if c.moe_router_score_function == "sigmoid":
            scores = torch.sigmoid(logits)
            choice = scores if self.expert_bias is None else scores + self.expert_bias
            top = torch.topk(choice, k, dim=-1).indices
            weights = scores.gather(-1, top)
            if k > 1:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        elif c.moe_router_pre_softmax:
            weights, top = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
        else:
            top_logits, top = torch.topk(logits, k, dim=-1)
            weights = torch.softmax(top_logits, dim=-1)
        if c.moe_router_topk_scaling_factor is not None:
            weights = weights * c.moe_router_topk_scaling_factor
        return weights, top


class SharedExpertMLP(MLP):
    """The shared expert: an MLP of its own width, and with `moe_shared_expert_gate` a learned
    sigmoid gate per token (Qwen2-MoE's shared_expert_gate)."""

    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules, parallel_state: ParallelState) -> None:
        super().__init__(config, submodules, parallel_state, ffn_hidden_size=config.moe_shared_expert_intermediate_size,
                         reduce_output=False)
        self.gate_weight = (
            nn.Parameter(torch.empty(1, config.hidden_size, dtype=config.params_dtype), requires_grad=False)
            if config.moe_shared_expert_gate else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = super().forward(hidden_states)  # [t, h], this rank's partial sum
        if self.gate_weight is not None:
            out = out * torch.sigmoid(F.linear(hidden_states, self.gate_weight))
        return out


class LocalExperts(nn.Module):
    def __init__(self, config: TransformerConfig, submodules: MLPSubmodules, parallel_state: ParallelState) -> None:
        super().__init__()
        self.local_experts = nn.ModuleList(
            MLP(config, submodules, parallel_state, ffn_hidden_size=config.moe_ffn_hidden_size, reduce_output=False)
            for _ in range(config.num_moe_experts)
        )


@dataclass
class MoESubmodules:
    experts: MLPSubmodules  # each expert's linears; the shared expert's too


class MoELayer(nn.Module):
    def __init__(self, config: TransformerConfig, submodules: MoESubmodules, parallel_state: ParallelState) -> None:
        super().__init__()
        self.config = config
        self.parallel_state = parallel_state
        self.router = TopKRouter(config)
        self.experts = LocalExperts(config, submodules.experts, parallel_state)
        self.shared_experts = (
            SharedExpertMLP(config, submodules.experts, parallel_state)
            if config.moe_shared_expert_intermediate_size else None
        )
        # Set by the model for its device: grouped on the CPU, dense (no host sync) on GPUs.
        self.dispatch = "grouped"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weights, top = self.router(hidden_states)  # [t, k] each
        weights = weights.to(hidden_states.dtype)
        run = self._grouped if self.dispatch == "grouped" else self._dense
        out = run(hidden_states, weights, top)  # [t, h], this rank's partial sum
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return reduce_from_tensor_model_parallel_region(out, self.parallel_state)

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        t, k = top.shape
        flat = top.reshape(-1)  # [t*k], slot s is token s // k
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.config.num_moe_experts).tolist()  # host sync
        tokens = order // k
        out = torch.zeros_like(x)
        start = 0
        for expert, count in zip(self.experts.local_experts, counts):
            if count:
                rows = tokens[start : start + count]
                slots = order[start : start + count]
                y = expert(x[rows]) * weights.reshape(-1)[slots, None]
                out.index_add_(0, rows, y)
            start += count
        return out

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        # [t, E]: each token's weight for every expert, zero where not chosen
        per_expert = torch.zeros(x.shape[0], self.config.num_moe_experts, dtype=x.dtype, device=x.device)
        per_expert.scatter_(1, top, weights)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts.local_experts):
            out = out + expert(x) * per_expert[:, e : e + 1]
        return out
