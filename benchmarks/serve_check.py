"""One streamed OpenAI completion through `tpserve serve`, with random weights, start to finish.

    python benchmarks/serve_check.py --hf-config benchmarks/configs/llama-3-8b.json --output-json r.json

Starts `tpserve serve --load-format dummy` on a checkpoint folder holding only the architecture's
config.json and tokenizer files (as throughput.py's --hf-config does), waits until it answers,
streams one /v1/completions request (greedy, end-of-sequence ignored, usage asked for), and stops
the server with SIGTERM. Reports the start-up time, the time to the first event, the token count
and whether the stream ended with [DONE]; exits 1 when the answer is not whole.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from provenance import provenance
from throughput import config_only_checkpoint

MODEL_NAME = "serve-check"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-config", type=Path, required=True, help="a Hugging Face config.json: the architecture served")
    p.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json and tokenizer_config.json "
                                                  "(default: the default model's)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--kv-cache-memory", metavar="SIZE", help="passed to tpserve serve (default: measured)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds the server may take to answer")
    p.add_argument("--output-json", type=Path, required=True)
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """The server refuses connections until its model is loaded; /health answers 200 after that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"tpserve serve exited with code {proc.returncode} before answering")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"tpserve serve did not answer within {timeout} s")


def stream_completion(url: str, max_tokens: int) -> dict:
    """Reads the SSE events as they come: the first one's time, the text chunks, the usage chunk, [DONE]."""
    body = {"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first_event_s, chunks, usage, done, text = None, 0, None, False, ""
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            if first_event_s is None:
                first_event_s = time.perf_counter() - started
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                chunks += 1
                text += choice["text"]
    return {"ttft_ms": round(1e3 * first_event_s, 1) if first_event_s is not None else None,
            "total_s": round(time.perf_counter() - started, 3), "text_chunks": chunks, "usage": usage,
            "done": done, "text": text}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="tpserve-serve-check-") as tmp:
        checkpoint = config_only_checkpoint(args.hf_config, Path(tmp), args.tokenizer)
        # -P: the working directory (the repository root, where our kernels/ would shadow Hugging
        # Face's `kernels`) stays off sys.path, in the server and in the workers it spawns.
        command = [sys.executable, "-P", "-m", "tpserve.server.cli", "serve", "--checkpoint", str(checkpoint),
                   "--load-format", "dummy", "--port", str(port), "--served-model-name", MODEL_NAME,
                   "--max-model-len", "1024", "--max-num-seqs", "8"]
        if args.kv_cache_memory:
            command += ["--kv-cache-memory", args.kv_cache_memory]
        started = time.perf_counter()
        proc = subprocess.Popen(command)
        try:
            wait_until_up(proc, url, args.start_timeout)
            startup_s = time.perf_counter() - started
            answer = stream_completion(url, args.max_tokens)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = proc.wait()
    result = {"benchmark": "serve_check", **provenance("serve_check.py", argv), "server_command": " ".join(command),
              "startup_s": round(startup_s, 2), **answer, "server_exit_code": exit_code}
    whole = answer["done"] and (answer["usage"] or {}).get("completion_tokens") == args.max_tokens
    print(f"serve: up in {startup_s:.1f} s, first event after {answer['ttft_ms']} ms, usage {answer['usage']}, "
          f"[DONE] {'seen' if answer['done'] else 'missing'}, server exit code {exit_code}")
    args.output_json.write_text(json.dumps(result, indent=1) + "\n")
    if not whole or exit_code != 0:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
