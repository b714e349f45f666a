"""The engine's host side (scheduler, engine, async engine, the server's client) never loads the
model, the workers' step code or CUDA graphs: those live in the worker processes only."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("tpserve.model.gpt_model", "tpserve.engine.model_runner", "tpserve.engine.cuda_graph")


def test_importing_the_host_side_loads_no_model_code(tmp_path):
    script = (
        "import sys\n"
        "from tpserve.engine.llm_engine import LLMEngine\n"
        "from tpserve.engine.scheduler import Scheduler\n"
        "from tpserve.engine.async_engine import AsyncLLMEngine\n"
        "from tpserve.engine.client import EngineClient\n"
        "from tpserve.engine.llm import LLM\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    # A fresh interpreter, run outside the repository (-I: the root, whose kernels/ folder
    # shadows Hugging Face's `kernels`, is not put on sys.path).
    out = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
    # And the check can fail: the worker's module does load them.
    out = subprocess.run([sys.executable, "-I", "-c", "import sys, tpserve.engine.worker\n"
                          f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == repr(sorted(HEAVY))
