"""Online serving benchmark for any OpenAI-compatible server (tpserve, vLLM, llama.cpp's, TGI).

Requests stream from /v1/completions (or /v1/chat/completions) at --request-rate (Poisson
arrivals; `inf` sends them all at once), at most --max-concurrency in flight. The metrics follow
`vllm bench serve`:

- TTFT: request sent -> first chunk that carries a choice.
- ITL: the gap between successive chunks, pooled over all requests.
- TPOT: (latency - TTFT) / (output tokens - 1), one per request with more than one token.
- E2EL: request sent -> last chunk.
- Output tokens: the server's streamed `usage` where it sends one, else the tokenizer's count of
  the text.
- Goodput: requests/s of those meeting every SLO of --goodput (e.g. `ttft:2000 tpot:100`, ms).

A sweep (`--max-concurrency 1,8,32,64`, or several `--request-rate`s) runs each point after a
warm-up, --repeats times, on the same prompts, and reports the median of each figure with its
spread over the repeats; the JSON holds every run, the PNG throughput and latency percentiles
against concurrency (or rate). With --launch, the script starts the server itself and measures
its startup: process start to the first generated token.

    # against a running server
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --max-concurrency 1,8,32,64 \\
        --num-prompts 8,32,64,128 --ignore-eos --output-json r.json --plot r.png
    # start, measure and stop it
    python benchmarks/serving.py --launch 'tpserve serve --port {port}' --max-concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import time
from pathlib import Path

import httpx
from provenance import provenance, write_result


@dataclasses.dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    output_tokens: int | None = None  # from the server's usage, when it sends one


@dataclasses.dataclass
class Prompt:
    text: str
    num_tokens: int


# --- prompts ---------------------------------------------------------------------------------


def random_prompts(tokenizer, num: int, input_len: int, input_len_range: float, seed: int) -> list[Prompt]:
    """Random token ids decoded to text, as vLLM's random dataset makes them, so every server
    receives the same text. Decoding and re-encoding can merge or split tokens; a few rounds of
    cutting or topping up bring the re-encoded length to the drawn one (or near it)."""
    rng = random.Random(seed)
    low = max(1, int(input_len * (1 - input_len_range)))
    high = max(low, int(input_len * (1 + input_len_range)))
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    prompts = []
    for _ in range(num):
        length = rng.randint(low, high)
        ids = [rng.choice(vocab) for _ in range(length)]
        for _ in range(10):
            text = tokenizer.decode(ids)
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == length:
                break
            ids = ids[:length] + [rng.choice(vocab) for _ in range(length - len(ids))]
        prompts.append(Prompt(text, len(ids)))
    return prompts


def file_prompts(tokenizer, path: str, num: int) -> list[Prompt]:
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"--prompt-file {path} has no non-empty line")
    return [Prompt(t, len(tokenizer.encode(t, add_special_tokens=False))) for t in (lines[i % len(lines)] for i in range(num))]


# --- one request -----------------------------------------------------------------------------


async def send(client: httpx.AsyncClient, url: str, payload: dict, prompt: Prompt, chat: bool) -> RequestResult:
    result = RequestResult(prompt.num_tokens)
    body = dict(payload)
    if chat:
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                now = time.perf_counter()
                if choices := chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    piece = choices[0].get("delta", {}).get("content") if chat else choices[0].get("text")
                    result.text += piece or ""
                if usage := chunk.get("usage"):
                    result.output_tokens = usage.get("completion_tokens")
        result.latency = last - start
        result.success = result.ttft > 0.0
        if not result.success:
            result.error = "the stream carried no token"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


# --- one run ---------------------------------------------------------------------------------


async def run_requests(base_url: str, endpoint: str, payload: dict, prompts: list[Prompt], request_rate: float,
                       max_concurrency: int | None, seed: int, timeout: float) -> tuple[list[RequestResult], float]:
    """All prompts, arriving as a Poisson process of `request_rate` (or at once), at most
    `max_concurrency` in flight. Returns the results and the wall time of the whole run."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    chat = endpoint.rstrip("/").endswith("chat/completions")
    limits = httpx.Limits(max_connections=max_concurrency or len(prompts), max_keepalive_connections=max_concurrency or len(prompts))
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:

        async def one(prompt: Prompt) -> RequestResult:
            if limit is None:
                return await send(client, endpoint, payload, prompt, chat)
            async with limit:
                return await send(client, endpoint, payload, prompt, chat)

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(prompt)))
            if not math.isinf(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def distribution(values: list[float], percentiles: list[float]) -> dict:
    """mean, median, std and the asked percentiles, in ms, as vLLM prints them."""
    if not values:
        return {"mean": None, "median": None, "std": None, **{f"p{p:g}": None for p in percentiles}}
    ordered = sorted(values)

    def pct(p: float) -> float:  # linear interpolation, numpy's default
        k = (len(ordered) - 1) * p / 100
        lo, hi = math.floor(k), math.ceil(k)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    ms = 1000.0
    return {"mean": statistics.fmean(values) * ms, "median": statistics.median(values) * ms,
            "std": statistics.pstdev(values) * ms, **{f"p{p:g}": pct(p) * ms for p in percentiles}}


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    slos = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise SystemExit(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, not {item!r}")
        slos[name] = float(value)
    return slos


def summarize(results: list[RequestResult], duration: float, tokenizer, slos: dict[str, float],
              percentiles: list[float]) -> dict:
    ok = [r for r in results if r.success]
    output_lens = []
    for r in ok:
        n = r.output_tokens if r.output_tokens is not None else len(tokenizer.encode(r.text, add_special_tokens=False))
        output_lens.append(n)
    ttfts = [r.ttft for r in ok]
    tpots = [(r.latency - r.ttft) / (n - 1) for r, n in zip(ok, output_lens) if n > 1]
    itls = [gap for r in ok for gap in r.itl]
    e2els = [r.latency for r in ok]
    good = 0
    for r, n in zip(ok, output_lens):
        tpot = (r.latency - r.ttft) / (n - 1) if n > 1 else 0.0
        measured = {"ttft": r.ttft, "tpot": tpot, "e2el": r.latency}
        good += all(measured[k] * 1000 <= v for k, v in slos.items())
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(output_lens)
    errors = sorted({r.error for r in results if not r.success})
    return {
        "successful_requests": len(ok),
        "failed_requests": len(results) - len(ok),
        "errors": errors[:5],
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "output_tokens_from": "usage" if ok and all(r.output_tokens is not None for r in ok) else "tokenizer",
        "request_throughput": len(ok) / duration,
        "request_goodput": good / duration if slos else None,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": distribution(ttfts, percentiles),
        "tpot_ms": distribution(tpots, percentiles),
        "itl_ms": distribution(itls, percentiles),
        "e2el_ms": distribution(e2els, percentiles),
    }


# The figures a point's summary takes the median of over its repeats.
SCALARS = ("request_throughput", "request_goodput", "output_throughput", "total_token_throughput")
LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


def combine(runs: list[dict]) -> dict:
    """One point: the median of each figure over the repeats, and the spread (min, max) of each."""
    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    point = {"repeats": len(runs), "failed_requests": sum(r["failed_requests"] for r in runs),
             "successful_requests": sum(r["successful_requests"] for r in runs),
             "output_tokens_from": runs[0]["output_tokens_from"], "errors": sorted({e for r in runs for e in r["errors"]})[:5]}
    for key in SCALARS + ("duration_s",):
        values = [r[key] for r in runs if r[key] is not None]
        point[key] = med(values)
        point[key + "_spread"] = [min(values), max(values)] if values else None
    for key in LATENCIES:
        point[key] = {stat: med([r[key][stat] for r in runs]) for stat in runs[0][key]}
        medians = [r[key]["median"] for r in runs if r[key]["median"] is not None]
        point[key]["median_spread"] = [min(medians), max(medians)] if medians else None
    return point


def print_point(label: str, point: dict, percentiles: list[float]) -> None:
    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    print(f"{'=' * 18} {label} {'=' * max(0, 50 - len(label))}")
    print(f"{'Successful requests:':<40}{point['successful_requests']:>12}")
    print(f"{'Failed requests:':<40}{point['failed_requests']:>12}")
    for e in point["errors"]:
        print(f"  error: {e}")
    print(f"{'Benchmark duration (s), median:':<40}{fmt(point['duration_s']):>12}")
    print(f"{'Request throughput (req/s):':<40}{fmt(point['request_throughput']):>12}")
    if point["request_goodput"] is not None:
        print(f"{'Request goodput (req/s):':<40}{fmt(point['request_goodput']):>12}")
    lo, hi = point["output_throughput_spread"] or (None, None)
    print(f"{'Output token throughput (tok/s):':<40}{fmt(point['output_throughput']):>12}   [{fmt(lo)}, {fmt(hi)}]")
    print(f"{'Total token throughput (tok/s):':<40}{fmt(point['total_token_throughput']):>12}")
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2EL")):
        d = point[key]
        pcts = "  ".join(f"P{p:g} {fmt(d[f'p{p:g}'])}" for p in percentiles)
        print(f"{name + ' (ms):':<12} mean {fmt(d['mean'])}  median {fmt(d['median'])}  {pcts}")


# --- the server under test -------------------------------------------------------------------


class LaunchedServer:
    """A server command started in its own process group, timed from `Popen` to its first token."""

    def __init__(self, command: str, port: int, log_path: Path, env: dict | None = None) -> None:
        self.command = command.format(port=port)
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(shlex.split(self.command), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, **(env or {})})

    def wait_first_token(self, endpoint: str, payload: dict, timeout: float) -> float:
        """Seconds from process start to the first token of a one-token request."""
        chat = endpoint.rstrip("/").endswith("chat/completions")
        body = {**payload, "max_tokens": 1, "stream": False}
        body.pop("stream_options", None)
        body.update({"messages": [{"role": "user", "content": "Hello"}]} if chat else {"prompt": "Hello"})
        deadline = self.started + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                r = httpx.post(self.base_url + endpoint, json=body, timeout=30)
                if r.status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"no token from the server within {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def served_model(base_url: str) -> str:
    r = httpx.get(base_url + "/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


# --- the sweep -------------------------------------------------------------------------------


def sweep_points(args) -> list[tuple[str, float, int | None, int]]:
    """(label, request rate, max concurrency, number of prompts) of each point."""
    rates = [float(r) for r in str(args.request_rate).split(",")]
    concurrencies = [int(c) if c not in ("", "none") else None for c in str(args.max_concurrency).split(",")]
    if len(rates) > 1 and len(concurrencies) > 1:
        raise SystemExit("sweep one of --request-rate and --max-concurrency, not both")
    points = [(r, c) for r in rates for c in concurrencies]
    counts = [int(n) for n in str(args.num_prompts).split(",")]
    if len(counts) == 1:
        counts *= len(points)
    if len(counts) != len(points):
        raise SystemExit(f"--num-prompts has {len(counts)} values for {len(points)} sweep points")
    return [(f"rate {'inf' if math.isinf(r) else f'{r:g}'}, concurrency {c or 'unlimited'}", r, c, n)
            for (r, c), n in zip(points, counts)]


def request_payload(args, model: str) -> dict:
    payload = {"model": model, "max_tokens": args.output_len, "stream": True, "temperature": args.temperature,
               "stream_options": {"include_usage": True}}
    if args.ignore_eos:
        payload["ignore_eos"] = True  # vLLM's and tpserve's extension; others take --extra-body
    payload.update(json.loads(args.extra_body))
    return {k: v for k, v in payload.items() if v is not None}  # null in --extra-body drops a field


def load_tokenizer(name: str | None):
    from transformers import AutoTokenizer

    if name is None:
        from tpserve.model.checkpoint import prepare_default_model

        name = str(prepare_default_model())  # the checkpoint folder holds its tokenizer
    return AutoTokenizer.from_pretrained(name)


def benchmark(args, base_url: str, tokenizer, prompts_for: dict[int, list[Prompt]]) -> list[dict]:
    """Every sweep point against one running server; returns the points with their runs."""
    model = args.model or served_model(base_url)
    payload = request_payload(args, model)
    slos = parse_goodput(args.goodput)
    percentiles = [float(p) for p in args.percentiles.split(",")]
    points = []
    for label, rate, concurrency, num in sweep_points(args):
        prompts = prompts_for[num]
        warmup = prompts[: max(1, min(len(prompts), concurrency or len(prompts)))]
        asyncio.run(run_requests(base_url, args.endpoint, {**payload, "max_tokens": min(args.output_len, 16)},
                                 warmup, math.inf, concurrency, args.seed, args.timeout))
        runs = []
        for repeat in range(args.repeats):
            results, duration = asyncio.run(run_requests(base_url, args.endpoint, payload, prompts, rate, concurrency,
                                                         args.seed + repeat, args.timeout))
            runs.append(summarize(results, duration, tokenizer, slos, percentiles))
        point = {"label": label, "request_rate": "inf" if math.isinf(rate) else rate, "max_concurrency": concurrency,
                 "num_prompts": num, **combine(runs), "runs": runs}
        print_point(label, point, percentiles)
        points.append(point)
    return points


def host() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def make_prompts(args, tokenizer) -> dict[int, list[Prompt]]:
    """One prompt list per distinct --num-prompts, each a prefix of the longest, so the points share prompts."""
    most = max(n for *_, n in sweep_points(args))
    if args.prompt_file:
        prompts = file_prompts(tokenizer, args.prompt_file, most)
    else:
        prompts = random_prompts(tokenizer, most, args.input_len, args.input_len_range, args.seed)
    return {n: prompts[:n] for *_, n in sweep_points(args)}


def run_server(args, name: str, launch: str | None, tokenizer, prompts_for, env: dict | None = None) -> dict:
    """Benchmark one server (started here when `launch` is given). Returns its part of the JSON."""
    server = {"name": name, "command": launch}
    if launch:
        log_path = Path(args.log_dir) / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        launched = LaunchedServer(launch, args.port, log_path, env)
        try:
            model = args.model or "default"
            payload = {"model": model, "temperature": 0.0}
            if args.model is None:  # learn the name once the server answers
                deadline = time.perf_counter() + args.startup_timeout
                while True:
                    try:
                        payload["model"] = served_model(launched.base_url)
                        break
                    except httpx.HTTPError:
                        if launched.proc.poll() is not None or time.perf_counter() > deadline:
                            raise RuntimeError(f"{name} did not come up; see {log_path}") from None
                        time.sleep(0.1)
            server["startup_s"] = launched.wait_first_token(args.endpoint, payload, args.startup_timeout)
            print(f"{name}: first token {server['startup_s']:.1f} s after process start")
            server["points"] = benchmark(args, launched.base_url, tokenizer, prompts_for)
        finally:
            launched.stop()
    else:
        server["points"] = benchmark(args, args.base_url, tokenizer, prompts_for)
    return server


def plot(servers: list[dict], path: str, title: str) -> None:
    """Output throughput, and TTFT/TPOT median and p99, against concurrency (or rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for server in servers:
        points = server["points"]
        by_rate = len({p["request_rate"] for p in points}) > 1
        xs = [p["request_rate"] if by_rate else p["max_concurrency"] or p["num_prompts"] for p in points]
        xlabel = "request rate (req/s)" if by_rate else "max concurrency"
        spread = [p["output_throughput_spread"] or [p["output_throughput"]] * 2 for p in points]
        ys = [p["output_throughput"] for p in points]
        axes[0].errorbar(xs, ys, yerr=[[y - s[0] for y, s in zip(ys, spread)], [s[1] - y for y, s in zip(ys, spread)]],
                         marker="o", capsize=3, label=server["name"])
        for ax, key, name in ((axes[1], "ttft_ms", "TTFT"), (axes[2], "tpot_ms", "TPOT")):
            line, = ax.plot(xs, [p[key]["median"] for p in points], marker="o", label=f"{server['name']} median")
            p99 = next((k for k in points[0][key] if k.startswith("p99")), None)
            if p99:
                ax.plot(xs, [p[key][p99] for p in points], marker="x", linestyle="--", color=line.get_color(),
                        label=f"{server['name']} {p99}")
        for ax in axes:
            ax.set_xlabel(xlabel)
            if not by_rate:
                ax.set_xscale("log", base=2)
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_title("Output throughput (median, min-max bars)")
    for ax, name in ((axes[1], "Time to first token"), (axes[2], "Time per output token")):
        ax.set_ylabel("ms (log scale)")
        ax.set_yscale("log")  # servers that queue requests differ from batching ones by 100x
        ax.set_title(name)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", help="the model name sent in requests (default: the server's first in /v1/models)")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer folder for prompts and token counts "
                                       "(default: the default model's)")
    p.add_argument("--num-prompts", default="64", help="requests per run; one value, or one per sweep point")
    p.add_argument("--input-len", type=int, default=32, help="random prompt length in tokens (centre)")
    p.add_argument("--input-len-range", type=float, default=0.25,
                   help="random prompt lengths are uniform in input-len * [1 - r, 1 + r]")
    p.add_argument("--prompt-file", help="one prompt per line (text), instead of random ones")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of every request")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: every request runs --output-len tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--extra-body", default="{}", help="JSON merged into every request, for a server's own fields")
    p.add_argument("--request-rate", default="inf", help="requests/s (Poisson arrivals), inf for all at once; "
                                                         "a comma list sweeps it")
    p.add_argument("--max-concurrency", default="none", help="requests in flight at most; a comma list sweeps it")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point, after one warm-up")
    p.add_argument("--goodput", nargs="*", metavar="SLO:MS", help="SLOs for goodput: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--percentiles", default="50,90,99")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one request may take")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8000, help="the port given to --launch commands as {port}")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--log-dir", default="benchmarks/logs", help="where launched servers' logs go")
    p.add_argument("--output-json", help="where to write the results")
    p.add_argument("--plot", help="where to draw the PNG (needs matplotlib)")


def result_header(args, argv: list[str] | None, script: str) -> dict:
    return {
        "benchmark": "serving",
        **provenance(script, argv),
        "device": host(),
        "setup": {k: v for k, v in vars(args).items() if k not in ("output_json", "plot", "log_dir")},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="a running server (unless --launch)")
    p.add_argument("--launch", help="start the server with this command ({port} is replaced) and time its startup")
    p.add_argument("--name", default="server", help="the server's name in the output")
    add_arguments(p)
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    prompts_for = make_prompts(args, tokenizer)
    result = result_header(args, argv, "serving.py")
    result["servers"] = [run_server(args, args.name, args.launch, tokenizer, prompts_for)]
    if args.output_json:
        write_result(args.output_json, result)
    if args.plot:
        plot(result["servers"], args.plot, f"{args.name} on {result['device']}")
    return result


if __name__ == "__main__":
    main()
