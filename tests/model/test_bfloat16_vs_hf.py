"""GPTModel in bfloat16 against Hugging Face transformers in bfloat16, same random weights.

bf16 keeps 8 bits of mantissa: two correct bf16 implementations differ by a few percent of the
logits' range after two layers, and each differs from float32 by about as much. The test asks
for agreement with transformers' bf16 logits within 5% of the range, and that ours are at most
1.5x as far from the float32 logits as transformers' bf16 ones are; a wrong bias or a lost norm
breaks both.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import PagedStepper, build, converted, hf_logits, random_hf_model

CASES = ["gpt2", "llama_gqa"]


def _bf16_pair(case: str):
    hf32 = random_hf_model(case)
    config, state = converted(hf32)
    config = dataclasses.replace(config, transformer=dataclasses.replace(config.transformer, params_dtype=torch.bfloat16))
    return hf32, random_hf_model(case).to(torch.bfloat16), build(config, state)


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_logits_through_the_paged_cache_match_transformers(case):
    hf32, hf16, model = _bf16_pair(case)
    assert model.output_layer.weight is None or model.output_layer.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, hf32.config.vocab_size, (31,), generator=torch.Generator().manual_seed(2)).tolist()
    truth, reference = hf_logits(hf32, tokens), hf_logits(hf16, tokens).float()
    stepper = PagedStepper(model)
    assert stepper.model.decoder.layers[0].self_attention.core_attention.bound_kv_cache()[0].dtype == torch.bfloat16
    got = [stepper.step([("s", tokens[:11])])[0]]  # prefill, then 20 single-token decode steps
    for p in range(11, 31):
        got.append(stepper.step([("s", [tokens[p]])])[0])
    got = torch.cat(got)
    assert got.dtype == torch.bfloat16
    got = got.float()
    scale = truth.abs().max()
    torch.testing.assert_close(got, reference, atol=0.05 * scale, rtol=0)
    assert (got - truth).abs().max() <= 1.5 * (reference - truth).abs().max()


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_whole_sequence_forward_matches_transformers(case):
    hf32, hf16, model = _bf16_pair(case)
    ids = torch.randint(0, hf32.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        truth, reference = hf32(ids).logits, hf16(ids).logits.float()
        got = model(ids, torch.arange(17).expand(2, 17)).float()
    scale = truth.abs().max()
    torch.testing.assert_close(got, reference, atol=0.05 * scale, rtol=0)
    assert (got - truth).abs().max() <= 1.5 * (reference - truth).abs().max()
