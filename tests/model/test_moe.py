"""Mixtures of experts (model/moe.py) against Hugging Face transformers: random Mixtral,
Qwen2-MoE, Qwen3-MoE and OLMoE models (router orders, top 1 and 2, a gated shared expert, dense
and MoE layers interleaved, q and k normalised per head and across heads) give transformers'
logits, for a whole sequence and for prefill, decode and mixed steps through the paged cache; both ways of running the experts agree; and at TP 2 and 4 each
rank holds its slices of every expert and the logits stay the same."""

from __future__ import annotations

import pytest
import torch
from helpers import MOE_CASES, PagedStepper, build, converted, hf_logits, random_hf_model

from tpserve.model.launcher import RankContext
from tpserve.model.moe import MoELayer

TOKENS = [[5, 9, 2, 77, 300, 41, 8, 3, 11, 12, 13, 200], [1, 200, 150, 12, 12, 12, 6, 0, 99, 98, 4, 4]]


@pytest.fixture(scope="module", params=sorted(MOE_CASES))
def case(request):
    hf = random_hf_model(request.param)
    config, state = converted(hf)
    return request.param, hf, config, state


def _steps(model) -> torch.Tensor:
    """Prefill (a: 7 tokens, b: 3), then 4 mixed steps: a decodes one token, b takes 2 more."""
    stepper = PagedStepper(model)
    a, b = TOKENS
    logits = [stepper.step([("a", a[:7]), ("b", b[:3])])]
    for k in range(4):
        logits.append(stepper.step([("a", [a[7 + k]]), ("b", b[3 + 2 * k : 5 + 2 * k])]))
    return torch.cat([torch.cat(x) for x in logits])


def _steps_reference(hf) -> torch.Tensor:
    """The rows `_steps` gives, from transformers' whole-sequence forwards."""
    a, b = (hf_logits(hf, t) for t in TOKENS)
    rows = [a[:7], b[:3]]
    for k in range(4):
        rows += [a[7 + k : 8 + k], b[3 + 2 * k : 5 + 2 * k]]
    return torch.cat(rows)


def test_logits_equal_hugging_face(case):
    name, hf, config, state = case
    model = build(config, state)
    assert any(isinstance(m, MoELayer) for m in model.modules())
    with torch.no_grad():
        for tokens in TOKENS:
            ours = model(torch.tensor([tokens]), torch.arange(len(tokens))[None])[0]
            torch.testing.assert_close(ours, hf_logits(hf, tokens), atol=1e-4, rtol=1e-4, msg=name)
        torch.testing.assert_close(_steps(model), _steps_reference(hf), atol=1e-4, rtol=1e-4, msg=name)


def test_dense_dispatch_equals_grouped(case):
    """Every expert on every token, weighted (no host sync: capturable in a CUDA graph), against
    each expert on its own tokens."""
    _, _, config, state = case
    model = build(config, state)
    grouped = _steps(model)
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.dispatch = "dense"
    torch.testing.assert_close(_steps(model), grouped, atol=1e-5, rtol=1e-5)


def _moe_bytes(model) -> dict[str, int]:
    """Parameter bytes of the experts' matrices (the shared expert's included), which TP splits,
    and of the routers and the shared expert's gate, which every rank holds whole."""
    out = {"experts": 0, "routers": 0}
    for name, p in model.named_parameters():
        if ".mlp.router." in name or name.endswith("shared_experts.gate_weight"):
            out["routers"] += p.numel() * p.element_size()
        elif ".mlp.experts." in name or ".mlp.shared_experts." in name:
            out["experts"] += p.numel() * p.element_size()
    return out


def _tp_logits(ctx: RankContext, config, state) -> tuple[torch.Tensor, dict[str, int]]:
    model = build(config, state, ctx.parallel_state)
    with torch.no_grad():
        return model(torch.tensor([TOKENS[0]]), torch.arange(len(TOKENS[0]))[None])[0], _moe_bytes(model)


@pytest.mark.slow
@pytest.mark.parametrize("name, tp", [("qwen2_moe", 2), ("qwen3_moe", 2), ("olmoe", 2), ("qwen2_moe", 4)])
def test_same_logits_at_tp2_and_4(worker_groups, name, tp):
    """Shared expert; q/k norms per head and across heads; at TP 4 with 4 key-value heads."""
    hf = random_hf_model(name, **({"num_key_value_heads": 4} if tp == 4 else {}))
    config, state = converted(hf)
    results = worker_groups.get(tp).run(_tp_logits, config, state)
    expected = hf_logits(hf, TOKENS[0])
    whole = _moe_bytes(build(config, state))
    for logits, held in results:
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
        # each rank holds 1/tp of every expert's matrices, and the whole routers and gates
        assert held == {"experts": whole["experts"] // tp, "routers": whole["routers"]}


def test_one_expert_for_every_token_and_experts_with_none():
    """A router whose expert bias sends every token to expert 0 (sigmoid scores, top 1; the bias
    chooses, the score weights): the layer's output is expert 0's times its score, through both
    dispatches, and the other experts get no token."""
    import torch.nn.functional as F

    from tpserve.model.config import TransformerConfig
    from tpserve.model.mlp import MLPSubmodules
    from tpserve.model.moe import MoESubmodules
    from tpserve.model.parallel_state import ParallelState
    from tpserve.model.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    config = TransformerConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, num_moe_experts=4, moe_router_topk=1,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
    )
    layer = MoELayer(config, MoESubmodules(MLPSubmodules(ColumnParallelLinear, RowParallelLinear)), ParallelState())
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.2)
        layer.router.expert_bias.copy_(torch.tensor([100.0, 0.0, 0.0, 0.0]))
        x = torch.randn(9, 32)
        weights, top = layer.router(x)
        score = torch.sigmoid(x @ layer.router.weight[0])[:, None]  # top 1: not renormalised (Megatron's rule)
        assert (top == 0).all() and torch.allclose(weights, score)
        expected = layer.experts.local_experts[0](x) * score
        for dispatch in ("grouped", "dense"):
            layer.dispatch = dispatch
            torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6)


def test_no_expert_choice_is_a_near_tie(case):
    """The premise of the exact comparisons above: routing the test tokens, the k-th and (k+1)-th
    router logits are never within 1e-3 (ours and transformers' differ by ~1e-6), so both pick
    the same experts. Checked on our routers' inputs, caught by a hook."""
    name, _, config, state = case
    model = build(config, state)
    k, margins = config.transformer.moe_router_topk, []

    def record(router, inputs, output):
        logits = torch.nn.functional.linear(inputs[0].float(), router.weight)
        # OLMoE's token 1 is its padding id, embedded as zeros: every expert scores exactly 0,
        # a tie both sides break the same way (lowest index). Only rows that differ count.
        logits = logits[logits.amax(-1) > logits.amin(-1)]
        top = torch.sort(logits, dim=-1, descending=True).values
        margins.append((top[..., k - 1] - top[..., k]).min().item())

    for m in model.modules():
        if isinstance(m, MoELayer):
            m.router.register_forward_hook(record)
    with torch.no_grad():
        for tokens in TOKENS:
            model(torch.tensor([tokens]), torch.arange(len(tokens))[None])
    assert margins and min(margins) > 1e-3, (name, margins)
