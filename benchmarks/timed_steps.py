"""Commands run one after another, each under its own time limit, into one log and one JSON.

What `gpu_check.py` needs from a lent GPU machine that gives it minutes, once: a step that hangs or
runs long is killed at its limit with everything it started (a server and its worker processes
too), and the next step still runs; each step's result is in the JSON as soon as it is known, so a
call cut short still brings back what came before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StepResult:
    # "ok", "failed" (a non-zero exit), "timed_out" (killed at its limit), "skipped", or "running"
    # (in the JSON while it runs: a call cut short shows which step it was in).
    status: str
    limit_s: float | None = None
    seconds: float | None = None
    returncode: int | None = None
    # Why a step was skipped, failed or timed out, in words.
    reason: str = ""
    # The figures a step's output gave (its own JSON, or what was parsed from its log).
    result: dict = field(default_factory=dict)


def run_limited(argv: list[str], limit_s: float, log: Path, env: dict | None = None,
                cwd: Path | None = None) -> tuple[int | None, float, str]:
    """Runs argv in cwd with stdout and stderr appended to log. Returns (exit code, seconds, its
    output); the exit code is None when it was killed at limit_s.

    The command gets a process group of its own (a new session), so at the limit SIGKILL reaches
    everything it started: a spawned worker or a server's children would otherwise live on, holding
    the GPU's memory through every later step.
    """
    start_offset = log.stat().st_size if log.exists() else 0
    started = time.perf_counter()
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True)
        try:
            returncode = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            returncode = None
        # Also after a normal exit: a child the command left running is not ours to keep.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    seconds = time.perf_counter() - started
    with log.open("rb") as f:
        f.seek(start_offset)
        output = f.read().decode(errors="replace")
    return returncode, seconds, output


class Report:
    """The JSON of a whole run, rewritten after every step (atomically: a reader never sees half)."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path = path
        self.data = {**header, "steps": {}}
        self.write()

    def set_step(self, name: str, step: StepResult) -> None:
        self.data["steps"][name] = {k: v for k, v in step.__dict__.items() if v not in (None, "", {})}
        self.write()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)
