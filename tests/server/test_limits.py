"""The server's guards, on a server with an API key, a 4 KiB body limit and a 50 ms request
timeout: 401 without the key (probes and metrics stay open), 413, and 504 past the timeout."""

from __future__ import annotations

import json

import httpx
import pytest

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def guarded(start_server):
    # 50 ms: no request of 100 tokens finishes in that (each step is a round trip to a worker).
    return start_server("--api-key", KEY, "--max-request-bytes", "4KB", "--request-timeout", "0.05")


def test_api_key(guarded):
    r = httpx.post(guarded.url + "/v1/completions", json={"prompt": "hi"}, timeout=60)
    assert r.status_code == 401 and "no API key was given" in r.json()["error"]["message"]
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(guarded.url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=60)
    assert r.status_code == 401 and "not valid" in r.json()["error"]["message"]
    for path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/generate"):
        method = "GET" if path == "/v1/models" else "POST"
        assert httpx.request(method, guarded.url + path, json={}, timeout=60).status_code == 401
    assert httpx.put(guarded.url + "/api", json={"prompts": ["hi"]}, timeout=60).status_code == 401
    assert httpx.get(guarded.url + "/v1/models", headers=AUTH, timeout=60).status_code == 200
    for open_path in ("/health", "/ready", "/metrics"):
        assert httpx.get(guarded.url + open_path, timeout=60).status_code == 200, open_path


def test_body_size_limit(guarded):
    big = {"prompt": "x" * 5000}
    r = httpx.post(guarded.url + "/v1/completions", json=big, headers=AUTH, timeout=60)
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        body = json.dumps(big).encode()
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    r = httpx.post(guarded.url + "/generate", content=chunks(), headers={**AUTH, "Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 413


def test_request_timeout_aborts(guarded):
    long = {"prompt": "Once upon a time", "max_tokens": 100, "ignore_eos": True}
    r = httpx.post(guarded.url + "/generate", json=long, headers=AUTH, timeout=60)
    assert r.status_code == 504 and "--request-timeout=0.05 s" in r.json()["error"]["message"]
    with httpx.stream("POST", guarded.url + "/v1/completions", json={**long, "stream": True}, headers=AUTH,
                      timeout=60) as r:
        if r.status_code == 200:  # the first token came in time: the timeout arrives inside the stream
            lines = [line for line in r.iter_lines() if line]
            assert "request-timeout" in lines[-2] and lines[-1] == "data: [DONE]"
        else:
            r.read()
            assert r.status_code == 504
    assert guarded.metric("tpserve_requests_aborted_total", 'reason="timeout"') >= 2
    guarded.wait_idle()
