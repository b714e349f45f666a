"""Schemathesis fuzzes every operation of the server's OpenAPI schema: no input may give a 5xx.

Its own server keeps each generated request cheap (--max-model-len 32, at most 4 sequences, so a
request asking for more is refused with 400 rather than run). The quick run draws a capped
number of examples per operation; the slow one adds schemathesis' coverage phase (every
boundary value of every field: ~1,200 requests).
"""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def fuzz_server(start_server):
    return start_server("--max-model-len", "32", "--max-num-seqs", "4")


def schemathesis(server, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """The schemathesis CLI against `server` (run in `cwd`, where it keeps its cache)."""
    command = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
               "--checks", "not_a_server_error", "--workers", "1", "--seed", "7", "--no-shrink",
               "--request-timeout", "120", "--suppress-health-check", "all", "--warnings", "off", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=cwd)


def test_fuzzing_finds_no_server_error(fuzz_server, tmp_path):
    run = schemathesis(fuzz_server, "--phases", "examples,fuzzing", "--max-examples", "20", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:] + fuzz_server.log_text()[-4000:]
    fuzz_server.wait_idle()


@pytest.mark.slow
def test_boundary_values_find_no_server_error(fuzz_server, tmp_path):
    run = schemathesis(fuzz_server, "--phases", "coverage", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:] + fuzz_server.log_text()[-4000:]
    fuzz_server.wait_idle()
