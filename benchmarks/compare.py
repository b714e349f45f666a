"""Side by side: our server, then each peer, on the same prompts, the same sweep and the same port.

Each server is started from its command ({port} is replaced; 127.0.0.1 only), timed from process
start to its first token, benchmarked with benchmarks/serving.py's sweep, and stopped before the
next one starts, so they never share the machine. One table of ratios (peer / ours) closes the
run; the JSON holds every server's points and runs, the PNG their curves.

    python benchmarks/compare.py --max-concurrency 1,8,32,64 --num-prompts 8,32,64,128 --ignore-eos \\
        --peer llama.cpp '/tmp/llama/bin/python -m llama_cpp.server --model FILE.gguf --port {port} --n_threads 2' \\
        --peer-extra-body llama.cpp '{"ignore_eos": null, "logit_bias": {"2": -100}}' \\
        --output-json benchmarks/results/compare.json --plot benchmarks/results/compare.png

A peer's extra body is merged over --extra-body; a key set to null is left out of its requests
(a server that refuses `ignore_eos` can be asked to ban the end-of-sequence token instead).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serving  # noqa: E402
from provenance import write_result  # noqa: E402


def ratio(a, b) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def print_table(servers: list[dict]) -> None:
    ours = servers[0]
    print("\n" + "=" * 100)
    header = f"{'point':<34}{'server':<14}{'out tok/s':>11}{'TTFT p50':>10}{'TPOT p50':>10}{'ITL p99':>10}"
    print(header + "   vs " + ours["name"] + ": tok/s, TTFT, TPOT")
    print("-" * 100)
    for i, point in enumerate(ours["points"]):
        for server in servers:
            p = server["points"][i]
            row = (f"{point['label'] if server is ours else '':<34}{server['name']:<14}{p['output_throughput']:>11.1f}"
                   f"{p['ttft_ms']['median'] or 0:>10.1f}{p['tpot_ms']['median'] or 0:>10.1f}{p['itl_ms'].get('p99') or 0:>10.1f}")
            if server is not ours:
                row += (f"   {ratio(p['output_throughput'], point['output_throughput'])}, "
                        f"{ratio(p['ttft_ms']['median'], point['ttft_ms']['median'])}, "
                        f"{ratio(p['tpot_ms']['median'], point['tpot_ms']['median'])}")
            print(row)
    print("-" * 100)
    for server in servers:
        print(f"{server['name']}: startup (process start to first token) {server['startup_s']:.1f} s"
              + (f", {ratio(server['startup_s'], ours['startup_s'])} ours" if server is not ours else ""))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The console script beside this Python, not `python -m`, which would put the working directory
    # (the repository root) on sys.path, where our kernels/ folder shadows Hugging Face's `kernels`.
    tpserve = shlex.quote(str(Path(sys.executable).with_name("tpserve")))
    p.add_argument("--ours", default=f"{tpserve} serve --port {{port}}", help="the command that starts our server")
    p.add_argument("--ours-name", default="tpserve")
    p.add_argument("--peer", nargs=2, action="append", default=[], metavar=("NAME", "COMMAND"),
                   help="a peer server's name and command; may repeat")
    p.add_argument("--peer-extra-body", nargs=2, action="append", default=[], metavar=("NAME", "JSON"),
                   help="request fields for one peer, merged over --extra-body (null drops a key)")
    serving.add_arguments(p)
    args = p.parse_args(argv)
    peer_bodies = dict(args.peer_extra_body)
    unknown = set(peer_bodies) - {name for name, _ in args.peer}
    if unknown:
        raise SystemExit(f"--peer-extra-body names no --peer: {sorted(unknown)}")

    tokenizer = serving.load_tokenizer(args.tokenizer)
    prompts_for = serving.make_prompts(args, tokenizer)
    result = serving.result_header(args, argv, "compare.py")
    result["servers"] = []
    base_body = json.loads(args.extra_body)
    for name, command in [(args.ours_name, args.ours), *args.peer]:
        body = {**base_body, **json.loads(peer_bodies.get(name, "{}"))}
        server_args = argparse.Namespace(**{**vars(args), "extra_body": json.dumps(body)})
        server = serving.run_server(server_args, name, command, tokenizer, prompts_for)
        server["extra_body"] = body
        result["servers"].append(server)
        if args.output_json:  # after each server, so a failed peer leaves the others' figures
            write_result(args.output_json, result)
    print_table(result["servers"])
    if args.plot:
        serving.plot(result["servers"], args.plot, " vs ".join(s["name"] for s in result["servers"])
                     + f" on {result['device']}")
    return result


if __name__ == "__main__":
    main()
