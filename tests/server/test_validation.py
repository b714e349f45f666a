"""Bad input: each gets a 4xx and an OpenAI-style error body whose message says what was wrong."""

from __future__ import annotations

import httpx
import pytest

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 30
CHAT = [{"role": "user", "content": "hi"}]

# (method, path, JSON body or raw bytes, status, words the message must contain)
CASES = [
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature: Input should be a valid number"),
    ("POST", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p: Input should be greater than 0"),
    ("POST", "/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p: Input should be less than or equal to 1"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens: Input should be greater than"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, 400,
     "maximum context length is 128 tokens. However, you requested 1000002 tokens (2 in the prompt, 1000000 for"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 10**30}, 400, "max_tokens: Input should be less than"),
    ("POST", "/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 1}, 400, "max_model_len is 128"),
    ("POST", "/v1/completions", {"prompt": ""}, 400, "the prompt is empty"),
    ("POST", "/v1/completions", {"prompt": []}, 400, "the prompt is empty"),
    ("POST", "/v1/completions", {"prompt": [5, 99999]}, 400, "outside the vocabulary"),
    ("POST", "/v1/completions", {"prompt": [5, -1]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": [[5, 6]] * 513}, 400, "a batch of 513 prompts exceeds"),
    ("POST", "/v1/completions", {"max_tokens": 3}, 400, "prompt: this field is required"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_token": 3}, 400, "max_token: unrecognized request argument"),
    ("POST", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "n: Input should be greater than or equal to 1"),
    ("POST", "/v1/completions", {"prompt": "hi", "n": 1000}, 400, "n: Input should be less than"),
    ("POST", "/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("POST", "/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop[0]='' must be a non-empty string"),
    ("POST", "/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias key 'abc'"),
    ("POST", "/v1/completions", {"prompt": "hi", "logit_bias": {"5": 200}}, 400, "logit_bias"),
    ("POST", "/v1/completions", {"prompt": "hi", "logit_bias": {"5000": 1}}, 400, "must be < vocab_size"),
    ("POST", "/v1/completions", {"prompt": "hi", "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens=9 must be <="),
    ("POST", "/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of=3 must equal n=1"),
    ("POST", "/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix is not supported"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens=0 generates nothing"),
    ("POST", "/v1/completions", {"prompt": "hi", "seed": "x"}, 400, "seed"),
    ("POST", "/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options is only allowed with stream=true"),
    ("POST", "/v1/completions", {"prompt": "hi", "response_format": {"type": "json_schema"}}, 400,
     'response_format type "json_schema" needs json_schema'),
    ("POST", "/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": "(x"}}, 400,
     "structured outputs regex cannot be compiled"),
    ("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
    ("POST", "/v1/completions", b'{"prompt": ', 400, "not valid JSON"),
    ("POST", "/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature: Input should be a finite"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "send a JSON object"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages: List should have at least 1 item"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "'image_url' are not supported"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400,
     "tools.0.function: this field is required"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, 400, "tool_choice needs tools"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs needs logprobs=true"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 500}, 400, "maximum context length is 128"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("POST", "/v1/chat/completions", {"messages": CHAT, "model": "other"}, 404, "The model `other` does not exist"),
    ("POST", "/generate", {"prompt": ""}, 400, "the prompt is empty"),
    ("POST", "/generate", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens: Input should be greater than"),
    ("POST", "/generate", {"prompt": "hi", "stream": 5}, 400, "stream: Input should be a valid boolean"),
    ("POST", "/generate", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("POST", "/nowhere", {}, 404, "no route POST /nowhere"),
    ("GET", "/v1/completions", None, 405, "method GET is not allowed"),
]


@pytest.mark.parametrize("method, path, body, status, message", CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input(server, method, path, body, status, message):
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else \
        {"json": body} if body is not None else {}
    r = httpx.request(method, server.url + path, timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"], error["message"]
    if status == 400:
        assert error["type"] == "invalid_request_error"


def test_a_long_prompt_error_gives_the_token_counts(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": LONG_PROMPT}, timeout=60)
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "tokens" in message and any(ch.isdigit() for ch in message)
