"""SamplingParams: every bad value is refused with a message naming it and the allowed range;
normalisation (stop, top_k=-1, JSON keys) and vLLM's defaults."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tpserve.engine.sampling_params import SamplingParams

BAD = [
    (dict(n=0), "n=0 must be >= 1"),
    (dict(n=1.5), "n=1.5 must be an integer"),
    (dict(n=True), "n=True must be an integer"),
    (dict(temperature=-1), "temperature=-1 must be >= 0"),
    (dict(temperature=float("nan")), "temperature=nan must be a finite number"),
    (dict(temperature="hot"), "temperature='hot' must be a finite number"),
    (dict(top_p=0), "top_p=0 must be in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5 must be in (0, 1]"),
    (dict(top_k=-2), "top_k=-2 must be >= 1, or 0 or -1 for off"),
    (dict(top_k=2.0), "top_k=2.0 must be an integer"),
    (dict(min_p=-0.1), "min_p=-0.1 must be in [0, 1]"),
    (dict(min_p=1.1), "min_p=1.1 must be in [0, 1]"),
    (dict(repetition_penalty=0), "repetition_penalty=0 must be > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty=inf must be a finite number"),
    (dict(presence_penalty=2.5), "presence_penalty=2.5 must be in [-2, 2]"),
    (dict(frequency_penalty=-3), "frequency_penalty=-3 must be in [-2, 2]"),
    (dict(logit_bias={5: 101}), "logit_bias[5]=101 must be in [-100, 100]"),
    (dict(logit_bias={-1: 1.0}), "logit_bias key -1 must be a token id >= 0"),
    (dict(logit_bias={"x": 1.0}), "logit_bias key 'x' must be a token id >= 0"),
    (dict(logit_bias=[1, 2]), "logit_bias=[1, 2] must be a dict of token id -> bias"),
    (dict(seed="7"), "seed='7' must be an integer"),
    (dict(max_tokens=0), "max_tokens=0 must be >= 1"),
    (dict(min_tokens=-1), "min_tokens=-1 must be >= 0"),
    (dict(min_tokens=20), "min_tokens=20 must be <= max_tokens=16"),
    (dict(stop=""), "stop[0]='' must be a non-empty string"),
    (dict(stop=["a", ""]), "stop[1]='' must be a non-empty string"),
    (dict(stop=["a", 3]), "stop[1]=3 must be a non-empty string"),
    (dict(stop=3), "stop=3 must be a string or a list of strings"),
    (dict(stop_token_ids=[1, -2]), "stop_token_ids[1]=-2 must be a token id >= 0"),
    (dict(stop_token_ids=5), "stop_token_ids=5 must be a list of token ids"),
    (dict(ignore_eos=1), "ignore_eos=1 must be True or False"),
    (dict(skip_special_tokens="no"), "skip_special_tokens='no' must be True or False"),
    (dict(logprobs=50), "logprobs=50 must be <= 20"),
    (dict(logprobs=-1), "logprobs=-1 must be >= 0"),
    (dict(prompt_logprobs=21), "prompt_logprobs=21 must be <= 20"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(ValueError) as error:
        SamplingParams(**kwargs)
    assert str(error.value) == message


def test_defaults_are_vllms():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.seed, p.logprobs, p.prompt_logprobs) == (16, 0, None, None, None)
    assert (p.stop, p.stop_token_ids, p.logit_bias) == ([], [], None)
    assert (p.ignore_eos, p.include_stop_str_in_output, p.skip_special_tokens) == (False, False, True)


def test_normalisation():
    p = SamplingParams(stop="###", top_k=-1, temperature=0, logit_bias={"17": 3, 4: -1.5}, max_tokens=None)
    assert p.stop == ["###"] and p.top_k == 0 and p.max_tokens is None
    assert p.temperature == 0.0 and isinstance(p.temperature, float)
    assert p.logit_bias == {17: 3.0, 4: -1.5}
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    # Edges that are allowed.
    SamplingParams(top_p=1.0, min_p=1.0, logprobs=0, prompt_logprobs=20, presence_penalty=-2, min_tokens=16)


def test_json_round_trip():
    """The step plan sends params as JSON (int keys become strings) and rebuilds them."""
    p = SamplingParams(n=2, top_k=5, logit_bias={3: 1.0}, stop=["x"], stop_token_ids=[9], seed=-5, logprobs=3)
    assert SamplingParams(**json.loads(json.dumps(dataclasses.asdict(p)))) == p


def test_token_ids_checked_against_the_vocabulary():
    SamplingParams(logit_bias={9: 1.0}, stop_token_ids=[9]).check_token_ids(10)
    with pytest.raises(ValueError, match=r"logit_bias token id 10 must be < vocab_size=10"):
        SamplingParams(logit_bias={10: 1.0}).check_token_ids(10)
    with pytest.raises(ValueError, match=r"stop_token_ids entry 12 must be < vocab_size=10"):
        SamplingParams(stop_token_ids=[12]).check_token_ids(10)
