"""`tpserve serve` across two "nodes" under torchrun: two `torchrun --nnodes 2 --node-rank 0|1`
processes on 127.0.0.1, one rank each, pipeline-parallel size 2. Node 0's rank serves HTTP and
runs the engine; node 1's runs its stage headless. The answers must equal the `LLM` API's at
PP 1; an idle server must outlive the collective timeout; and a rank that dies must take every
node down, non-zero, with an error event to the stream in flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from helpers import SERVE_PINS
from server_process import KV_CACHE, MAX_MODEL_LEN, children, free_port

from tpserve import SamplingParams

pytestmark = pytest.mark.slow
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
DISTRIBUTED_TIMEOUT = 6  # seconds; the idle test waits longer than this
PROMPTS = ["The capital of France is", "def add(a, b):", "1, 2, 3,"]


class TwoNodes:
    def __init__(self, checkpoint: Path, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        master_port = free_port()
        self.logs = [folder / f"node{r}.log" for r in (0, 1)]
        self.procs = []
        for node_rank in (0, 1):
            args = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node_rank),
                    "--master-addr", "127.0.0.1", "--master-port", str(master_port),
                    "-m", "tpserve.server.cli", "serve", "--checkpoint", str(checkpoint),
                    "--pipeline-parallel-size", "2", "--port", str(self.port), "--served-model-name", "tiny",
                    "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", KV_CACHE,
                    "--distributed-timeout", str(DISTRIBUTED_TIMEOUT), "--log-level", "warning", *SERVE_PINS]
            # Not from the repository root: `-m` puts the working folder first on sys.path, where
            # our `kernels/` folder would shadow the PyPI package transformers imports.
            self.procs.append(subprocess.Popen(
                args, cwd=folder, stdout=open(self.logs[node_rank], "w"), stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
            ))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a node exited:\n{self.log_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the nodes did not come up:\n{self.log_text()}")

    def rank_process(self, node_rank: int) -> int:
        """The pid of the rank torchrun started on that node."""
        (pid,) = children(self.procs[node_rank].pid)
        return pid

    def log_text(self) -> str:
        return "\n".join(f"--- node {r}:\n{log.read_text()}" for r, log in enumerate(self.logs))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def nodes(tiny_ckpt, tmp_path_factory):
    nodes = TwoNodes(tiny_ckpt, tmp_path_factory.mktemp("torchrun"))
    yield nodes
    nodes.stop()


def completions(nodes: TwoNodes) -> list[str]:
    client = openai.OpenAI(base_url=nodes.url + "/v1", api_key="none", max_retries=0, timeout=120)
    return [client.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0).choices[0].text
            for p in PROMPTS]


def test_two_nodes_answer_as_the_llm_api_at_pp1(nodes, reference):
    expected = [o.outputs[0].text for o in reference.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))]
    assert completions(nodes) == expected


def test_an_idle_server_outlives_the_collective_timeout(nodes, reference):
    time.sleep(DISTRIBUTED_TIMEOUT * 2)  # no request: only heartbeats keep the ranks' broadcasts within it
    expected = [o.outputs[0].text for o in reference.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24))]
    assert completions(nodes) == expected
    assert all(p.poll() is None for p in nodes.procs)


def test_a_dead_rank_stops_every_node_and_the_stream_gets_an_error(nodes):
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 100, "ignore_eos": True, "stream": True}
    events = []
    with httpx.stream("POST", nodes.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        events.append(next(line for line in lines if line.startswith("data: ")))
        # Stopped first, so the request is surely still running when node 1's rank dies.
        rank1 = nodes.rank_process(1)
        os.kill(rank1, signal.SIGSTOP)
        killed = time.monotonic()
        os.kill(rank1, signal.SIGKILL)
        events += [line for line in lines if line.startswith("data: ")]
    codes = []
    for proc in nodes.procs:
        codes.append(proc.wait(timeout=max(1.0, 30 - (time.monotonic() - killed))))
    assert time.monotonic() - killed < 30
    assert all(code != 0 for code in codes), (codes, nodes.log_text())
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "engine_dead" and "Connection closed by peer" in error["message"], error
