"""GPTModel logits equal Hugging Face transformers' for the same weights (fp32, random models).

Three ways through the model: a whole-sequence forward, prefill then 20 single-token decode
steps through the paged cache, and one packed batch mixing prefill, decode and chunked prefill.
"""

from __future__ import annotations

import pytest
import torch
from helpers import HF_CASES, PagedStepper, build, converted, hf_logits, random_hf_model

from tpserve.model.inference_params import InferenceParams
from tpserve.model.kv_cache import KVCache
from tpserve.model.packed_seq_params import PackedSeqParams

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module", params=sorted(HF_CASES))
def pair(request):
    hf_model = random_hf_model(request.param)
    config, state = converted(hf_model)
    return hf_model, build(config, state)


def test_whole_sequence_forward(pair):
    hf_model, model = pair
    ids = torch.randint(0, hf_model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = model(ids, torch.arange(17).expand(3, 17))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **TOL)


def test_prefill_then_decode_steps(pair):
    hf_model, model = pair
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, hf_model.config.vocab_size, (31,), generator=g).tolist()
    expected = hf_logits(hf_model, tokens)  # teacher forcing: position p's logits
    stepper = PagedStepper(model)
    got = [stepper.step([("s", tokens[:11])])[0]]
    for p in range(11, 31):  # 20 decode steps, one token each
        got.append(stepper.step([("s", [tokens[p]])])[0])
    torch.testing.assert_close(torch.cat(got), expected, **TOL)


def test_packed_batch_mixing_prefill_and_decode(pair):
    hf_model, model = pair
    g = torch.Generator().manual_seed(3)
    seqs = {k: torch.randint(0, hf_model.config.vocab_size, (n,), generator=g).tolist()
            for k, n in {"a": 7, "b": 6, "c": 9, "d": 2}.items()}
    stepper = PagedStepper(model)
    # Step 1 puts b's first 5 tokens and c's first 3 in the cache.
    first_b, first_c = stepper.step([("b", seqs["b"][:5]), ("c", seqs["c"][:3])])
    # Step 2, one packed forward: a fresh prefill (a), a decode (b), a prefill chunk over a
    # cached prefix (c), another fresh prefill (d).
    a, b, c, d = stepper.step([("a", seqs["a"]), ("b", seqs["b"][5:]), ("c", seqs["c"][3:]), ("d", seqs["d"])])
    torch.testing.assert_close(a, hf_logits(hf_model, seqs["a"]), **TOL)
    torch.testing.assert_close(torch.cat([first_b, b]), hf_logits(hf_model, seqs["b"]), **TOL)
    torch.testing.assert_close(torch.cat([first_c, c]), hf_logits(hf_model, seqs["c"]), **TOL)
    torch.testing.assert_close(d, hf_logits(hf_model, seqs["d"]), **TOL)


def test_logits_only_where_asked(pair):
    """The output layer runs on the rows `logits_indices` names (the last token of each sequence)."""
    hf_model, model = pair
    g = torch.Generator().manual_seed(4)
    a, b = (torch.randint(0, hf_model.config.vocab_size, (n,), generator=g).tolist() for n in (5, 8))
    model.bind_kv_cache(KVCache(model.config, num_blocks=8, block_size=4, dtype=torch.float32))
    params = InferenceParams(max_num_seqs=2, max_num_tokens=13, max_blocks_per_seq=4, block_size=4)
    positions = params.prepare([5, 8], [5, 8], [[6, 1], [2, 7]], logits_indices=[4, 12])
    with torch.no_grad():
        got = model(torch.tensor(a + b), positions, inference_params=params,
                    packed_seq_params=PackedSeqParams.from_lengths([5, 8]))
    expected = torch.stack([hf_logits(hf_model, a)[-1], hf_logits(hf_model, b)[-1]])
    torch.testing.assert_close(got, expected, **TOL)
