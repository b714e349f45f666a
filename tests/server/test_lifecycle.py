"""Lifecycle: SIGTERM drains requests in flight (and aborts what outlives --shutdown-timeout), a
full queue answers 429, and a killed worker makes readiness and requests fail with 503 at once.
No worker process outlives its server. Three servers, started side by side."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from server_process import alive


DRAIN_TOKENS = 240  # with the prompt, within the drain server's --max-model-len 256


class StreamReader(threading.Thread):
    """Reads one streamed /generate on its own thread; `first` is set by the first event."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, {**body, "ignore_eos": True, "stream": True}
        self.events: list[dict] = []
        self.status: int | None = None
        self.headers: dict = {}
        self.answer = ""  # a refusal's JSON body
        self.error: Exception | None = None
        self.first = threading.Event()
        self.last_event_at = 0.0  # time.monotonic()

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/generate", json=self.body, timeout=120) as r:
                self.status, self.headers = r.status_code, dict(r.headers)
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(json.loads(line[6:]))
                        self.last_event_at = time.monotonic()
                        self.first.set()
                    else:
                        self.answer += line
        except httpx.HTTPError as e:  # the server closed the connection mid-stream
            self.error = e
        finally:
            self.first.set()

    @property
    def finished(self) -> bool:
        return bool(self.events) and self.events[-1].get("finished") is True

    def started(self) -> "StreamReader":
        self.start()
        assert self.first.wait(60), "no first event"
        return self


def wait_for(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def servers(start_server):
    started = {
        # Long answers: on a fast CPU, 60 tokens of the tiny model were done before SIGTERM came.
        "drain": start_server("--shutdown-timeout", "60", "--max-model-len", "256", wait=False),
        # The last --max-model-len wins: 256 leaves room for two 250-token answers.
        "small": start_server("--max-num-seqs", "1", "--max-queued-requests", "1", "--shutdown-timeout", "0.05",
                              "--max-model-len", "256", wait=False),
        "dead": start_server(wait=False),
    }
    for server in started.values():
        server.wait_up()
        assert server.worker_pids, "no worker process found"
    return started


def test_sigterm_drains_requests_in_flight(servers):
    server = servers["drain"]
    readers = [StreamReader(server.url, {"prompt": f"Drain {i}", "max_tokens": DRAIN_TOKENS}) for i in range(3)]
    for reader in readers:
        reader.start()
    for reader in readers:
        assert reader.first.wait(60)
    signalled_at = time.monotonic()
    server.terminate()

    def refused() -> bool:  # a new request: the listening socket is closed, or 503 while draining
        try:
            return httpx.post(server.url + "/generate", json={"prompt": "late"}, timeout=5).status_code == 503
        except httpx.ConnectError:
            return True

    wait_for(refused, what="new requests to be refused")
    for reader in readers:
        reader.join(120)
        assert reader.finished, (reader.error, reader.events[-1:])
        assert reader.events[-1]["usage"]["completion_tokens"] == DRAIN_TOKENS
        assert reader.last_event_at > signalled_at, "done before SIGTERM: nothing was drained"
    assert server.proc.wait(60) == 0
    assert not any(alive(pid) for pid in server.worker_pids), "a worker outlived the server"


def test_a_full_queue_answers_429(servers):
    server = servers["small"]  # one running and one queued at most
    # Six at once: two fit, the others are refused at once (long before 250 tokens are out).
    readers = [StreamReader(server.url, {"prompt": f"Full {i}", "max_tokens": 250}) for i in range(6)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(120)
    refused = [r for r in readers if r.status == 429]
    assert refused and all(r.finished for r in readers if r not in refused)
    for r in refused:
        assert r.headers["retry-after"] == "1" and "the server is full" in json.loads(r.answer)["error"]["message"]
    assert server.metric("tpserve_requests_rejected_total", 'reason="queue_full"') == len(refused)


def test_sigterm_aborts_what_outlives_the_shutdown_timeout(servers):
    server = servers["small"]  # --shutdown-timeout 0.05, one request running and one queued
    readers = [StreamReader(server.url, {"prompt": p, "max_tokens": 250}) for p in ("one", "two")]
    for reader in readers:
        reader.start()
    # SIGTERM as soon as the first token of either is out: the other is still queued behind it, so
    # ~500 decode steps remain, which no machine runs within uvicorn's 0.1 s tick plus the timeout.
    wait_for(lambda: any(r.events for r in readers), 60, "a first token")
    server.terminate()
    assert server.proc.wait(30) == 0
    for reader in readers:
        reader.join(30)
        assert not reader.is_alive()
    # Each stream ends with a final event (finish_reason "abort" if the shutdown cut it short) or
    # is closed mid-way; at least one cannot have run its 250 tokens to the end.
    reasons = [r.events[-1]["outputs"][0]["finish_reason"] if r.finished else "cut off" for r in readers]
    assert reasons != ["length", "length"], "500 tokens, one at a time, within 0.15 s?"
    assert set(reasons) <= {"length", "abort", "cut off"}, reasons
    assert not any(alive(pid) for pid in server.worker_pids), "a worker outlived the server"


def test_a_killed_worker_fails_readiness_and_requests(servers):
    server = servers["dead"]
    assert httpx.get(server.url + "/ready", timeout=60).status_code == 200
    reader = StreamReader(server.url, {"prompt": "Once", "max_tokens": 120}).started()
    os.kill(server.worker_pids[0], signal.SIGKILL)
    killed = time.monotonic()
    reader.join(10)
    assert not reader.is_alive() and time.monotonic() - killed < 5.0, "the stream hung"
    assert "worker 0 died" in reader.events[-1]["error"]["message"]

    for path in ("/ready", "/health"):
        r = httpx.get(server.url + path, timeout=10)
        assert r.status_code == 503 and "worker 0 died" in r.json()["error"]["message"], path
    started = time.monotonic()
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert r.status_code == 503 and time.monotonic() - started < 2.0
    message = r.json()["error"]["message"]
    assert "worker 0 died" in message and "restart the server" in message
    r = httpx.post(server.url + "/generate", json={"prompt": "hi", "stream": True}, timeout=10)
    assert r.status_code == 503  # a stream refused before it starts gets its status
    assert server.metric("tpserve_engine_healthy") == 0.0

    server.terminate()
    assert server.proc.wait(30) == 0
    assert not any(alive(pid) for pid in server.worker_pids)
