"""Servers for the HTTP tests: `tpserve serve` as a real subprocess on 127.0.0.1 and a free port.

One tiny random checkpoint (Llama, vocab ~300, ChatML template) for the session; the shared
`server` is started once for the session, and modules that need other flags (limits, fuzzing,
shutdown) start their own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ENGINE_PINS, random_checkpoint
from server_process import MAX_MODEL_LEN, ServerProcess


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    path, _ = random_checkpoint(tmp_path_factory.mktemp("server_ckpt"))
    return path


@pytest.fixture(scope="session")
def start_server(tiny_ckpt, tmp_path_factory):
    """start_server(*flags) -> a running ServerProcess on the tiny checkpoint, stopped at the end
    (wait=False: started, not yet up; call its wait_up())."""
    started = []

    def start(*flags: str, checkpoint: Path | None = tiny_ckpt, wait: bool = True, env: dict | None = None
              ) -> ServerProcess:
        log = tmp_path_factory.mktemp("server_log") / "server.log"
        server = ServerProcess(checkpoint, log, *flags, wait=wait, env=env)
        started.append(server)
        return server

    yield start
    for server in started:  # all at once: each takes a second or two to drain and exit
        server.terminate()
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server) -> ServerProcess:
    """The shared server: default limits, no API key."""
    return start_server()


@pytest.fixture(scope="session")
def reference(tiny_ckpt):
    """The `LLM` API on the same checkpoint and length: what the server's answers must equal."""
    from tpserve import LLM

    llm = LLM(tiny_ckpt, max_model_len=MAX_MODEL_LEN, kv_cache_memory=8 << 20, **ENGINE_PINS)
    yield llm
    llm.shutdown()
