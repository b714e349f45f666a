"""POST /generate (streamed and not) and Megatron-LM's PUT /api, with httpx."""

from __future__ import annotations

import json

import httpx
import pytest

from tpserve import SamplingParams

PROMPT = "Once upon a time there"


def events(response: httpx.Response) -> list[dict]:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [json.loads(line[6:]) for line in lines]


def test_generate_equals_the_llm_api(server, reference):
    want = reference.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, logprobs=1))[0]
    r = httpx.post(server.url + "/generate", json={"prompt": PROMPT, "max_tokens": 10, "temperature": 0,
                                                   "logprobs": 1}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    (out,) = body["outputs"]
    assert out["text"] == want.outputs[0].text and out["token_ids"] == want.outputs[0].token_ids
    assert out["finish_reason"] == want.outputs[0].finish_reason
    assert [e["logprob"] for e in out["logprobs"]] == pytest.approx([e.logprob for e in want.outputs[0].logprobs],
                                                                    abs=1e-4)
    assert body["prompt_token_ids"] == want.prompt_token_ids
    assert body["usage"]["prompt_tokens"] == len(want.prompt_token_ids)
    assert body["usage"]["completion_tokens"] == 10


def test_generate_stream_adds_up_to_the_whole(server):
    request = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "n": 2, "seed": 5}
    whole = httpx.post(server.url + "/generate", json=request, timeout=60).json()
    with httpx.stream("POST", server.url + "/generate", json={**request, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        got = events(r)
    *deltas, final = got
    for out in whole["outputs"]:
        mine = [d for d in deltas if d["index"] == out["index"]]
        assert "".join(d["text"] for d in mine) == out["text"]
        assert [t for d in mine for t in d["token_ids"]] == out["token_ids"]
        assert [d["finish_reason"] for d in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1]["finish_reason"] == out["finish_reason"]
    assert final["finished"] is True and final["usage"] == whole["usage"]
    assert sorted(o["finish_reason"] for o in final["outputs"]) == sorted(o["finish_reason"] for o in whole["outputs"])


def test_generate_token_ids_and_prompt_logprobs(server, reference):
    ids = reference.get_tokenizer()(PROMPT)["input_ids"]
    r = httpx.post(server.url + "/generate", json={"prompt": ids, "max_tokens": 3, "temperature": 0,
                                                   "prompt_logprobs": 2}, timeout=60)
    body = r.json()
    assert body["prompt_token_ids"] == ids
    assert body["prompt_logprobs"][0] is None
    assert [e["token_id"] for e in body["prompt_logprobs"][1:]] == ids[1:]
    assert all(len(e["top"]) == 2 for e in body["prompt_logprobs"][1:])


def test_generate_echoes_the_request_id(server):
    r = httpx.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 2}, headers={"X-Request-Id": "abc-1"},
                   timeout=60)
    assert r.headers["x-request-id"] == "abc-1" and r.json()["id"] == "abc-1"
    # Reusing an id, even concurrently, is allowed: the engine's ids stay unique.
    assert httpx.post(server.url + "/generate", json={"prompt": "hi", "max_tokens": 2},
                      headers={"X-Request-Id": "abc-1"}, timeout=60).status_code == 200
    made_up = httpx.get(server.url + "/health").headers["x-request-id"]
    assert len(made_up) == 32


def test_megatron_api(server, reference):
    tokenizer = reference.get_tokenizer()
    prompts = ["The quick brown fox", "def add(a, b):"]
    r = httpx.put(server.url + "/api", json={"prompts": prompts, "tokens_to_generate": 6, "top_k": 1,
                                             "logprobs": True}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"text", "segments", "logprobs", "tokens"}
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        want = reference.generate(ids, SamplingParams(temperature=0, max_tokens=6, skip_special_tokens=False))[0]
        generated = want.outputs[0].token_ids
        assert body["tokens"][i] == ids + generated
        assert body["text"][i] == tokenizer.decode(ids + generated, skip_special_tokens=False)
        assert body["text"][i].startswith(prompt)
        assert len(body["segments"][i]) == len(ids + generated)
        assert len(body["logprobs"][i]) == len(ids + generated) - 1  # every token after the first


def test_megatron_scores_with_tokens_to_generate_0(server, reference):
    prompt = "The quick brown fox"
    ids = reference.get_tokenizer()(prompt, add_special_tokens=False)["input_ids"]
    want = reference.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    body = httpx.put(server.url + "/api", json={"prompts": [prompt], "tokens_to_generate": 0, "logprobs": True},
                     timeout=60).json()
    assert body["tokens"] == [ids] and body["text"] == [prompt]
    assert body["logprobs"][0] == pytest.approx([e.logprob for e in want.prompt_logprobs[1:]], abs=1e-4)


@pytest.mark.parametrize("request_body, message", [
    ({"tokens_to_generate": 4}, "prompts argument required"),
    ({"prompts": "hi"}, "prompts is not a list of strings"),
    ({"prompts": []}, "prompts is empty"),
    ({"prompts": ["x"] * 129}, "Maximum number of prompts is 128"),
    ({"prompts": ["hi"], "max_len": 4}, "max_len is no longer used"),
    ({"prompts": ["hi"], "tokens_to_generate": -1}, "greater than or equal to 0"),
    ({"prompts": ["hi"], "tokens_to_generate": 0}, "tokens_to_generate=0 implies logprobs should be True"),
    ({"prompts": ["hi"], "temperature": 0}, "temperature must be a positive number"),
    ({"prompts": ["hi"], "top_p": 1}, "top_p must be a positive float"),
    ({"prompts": ["hi"], "top_p": 0.5, "top_k": 5}, "cannot set both top-k and top-p samplings."),
    ({"prompts": [""]}, "Empty prompts require add_BOS=true"),
    ({"prompts": ["hi"], "beam_width": 2}, "beam search"),
    ({"prompts": ["hi"], "tokens_to_generate": 1000}, "Length of prompt + tokens_to_generate longer than allowed"),
])
def test_megatron_errors_are_megatrons(server, request_body, message):
    r = httpx.put(server.url + "/api", json=request_body, timeout=60)
    assert r.status_code == 400
    assert message in r.json()["message"]
