"""`tpserve serve` as a subprocess for the HTTP tests, and what they look up in /proc."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
from helpers import SERVE_PINS, TPSERVE

MAX_MODEL_LEN = 128
KV_CACHE = "8MB"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Live (non-zombie) child processes of `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def is_worker(pid: int) -> bool:
    """A spawned engine worker (not multiprocessing's resource tracker)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"spawn_main" in f.read()
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_healthy(url: str, procs: list[subprocess.Popen], timeout: float, log_text, stop) -> None:
    """Until `url`/health answers 200; RuntimeError with the logs if a process exits first, or
    after `stop()` if the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = [p.returncode for p in procs if p.poll() is not None]
        if exited:
            raise RuntimeError(f"the server exited ({exited[0]}):\n{log_text()}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop()
    raise RuntimeError(f"the server did not come up in {timeout} s:\n{log_text()}")


class ServerProcess:
    def __init__(self, checkpoint: Path | None, log_path: Path, *flags: str, wait: bool = True,
                 env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        args = [TPSERVE, "serve", "--port", str(self.port),
                "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", KV_CACHE, "--served-model-name", "tiny",
                "--log-level", "warning", *SERVE_PINS, *flags]
        if checkpoint is not None:  # None: the default model
            args += ["--checkpoint", str(checkpoint)]
        self.log = open(log_path, "w")
        # Its own session: a signal for the server never reaches the test process, and ours never it.
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        self.worker_pids: list[int] = []
        if wait:
            self.wait_up()

    def wait_up(self, timeout: float = 180.0) -> None:
        """Until /health answers; servers started with wait=False load side by side meanwhile."""
        self._wait_health(timeout)
        self.worker_pids = [pid for pid in children(self.proc.pid) if is_worker(pid)]

    def _wait_health(self, timeout: float) -> None:
        wait_healthy(self.url, [self.proc], timeout, self.log_text, self.stop)

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log_path).read_text()

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample of /metrics, e.g. metric("tpserve_kv_cache_usage_ratio")."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until no request runs and no KV block is held (aborts are asynchronous)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.metric("tpserve_kv_cache_usage_ratio") == 0.0
                    and self.metric("tpserve_num_requests_in_server") == 0.0
                    and self.metric("tpserve_num_running_sequences") == 0.0):
                return
            time.sleep(0.1)
        raise AssertionError(f"still busy after {timeout} s:\n" + httpx.get(self.url + "/metrics").text)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        self.terminate()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        for pid in self.worker_pids:  # never leave a worker behind, even when a test failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.log.close()
        return code
