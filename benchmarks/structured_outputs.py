"""What structured outputs cost: per-step mask time and throughput at 1, 8 and 64 requests in
flight, constrained by a JSON schema and not, on the default model (SmolLM2-135M-Instruct).

Every request makes --output-len tokens: unconstrained ones ignore end-of-sequence, constrained
ones follow a schema (an array of at least --output-len small objects) that cannot be complete
sooner. The mask time is the engine's: filling the bitmasks of a step's constrained sequences,
which runs while the ranks compute the forward (the sampling rank waits for it only when it is
longer). The CPU is named as `lscpu` names it (its /proc/cpuinfo model name).

    python benchmarks/structured_outputs.py --in-flight 1,8,64 --output-len 64 --output-json out.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from provenance import provenance, write_result

from tpserve.kernels.cpu_info import cpu_flags, cpu_model

PROMPT = "List some fictional employees as JSON:"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="tpserve checkpoint folder (default: the SmolLM2 default model)")
    p.add_argument("--in-flight", default="1,8,64", help="requests submitted at once, comma-separated")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--cpu-kernels", default="auto", help="CPU linear kernels: auto (timed, cached) or a name to pin")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the median is reported")
    p.add_argument("--output-json", help="where to write the results (default: print only)")
    return p.parse_args(argv)


def schema(output_len: int) -> dict:
    """At least output_len objects of several tokens each: never complete within output_len tokens."""
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    return {"type": "array", "items": person, "minItems": output_len}


class MaskClock:
    """Wraps the engine's BitmaskFiller.fill, timing each call (one per step with constrained sequences)."""

    def __init__(self, filler) -> None:
        self.filler, self.fill, self.times = filler, filler.fill, []
        filler.fill = self._timed

    def _timed(self, matchers):
        start = time.perf_counter()
        masks = self.fill(matchers)
        self.times.append(time.perf_counter() - start)
        return masks


def run(llm, params, count: int) -> tuple[float, int]:
    """Seconds to finish `count` requests submitted at once, and the output tokens they made."""
    start = time.perf_counter()
    outs = llm.generate([PROMPT] * count, params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from tpserve import LLM, SamplingParams
    from tpserve.engine.llm_engine import StepTimes
    from tpserve.engine.structured_outputs import StructuredOutputsParams
    from tpserve.model.checkpoint import prepare_default_model
    from tpserve.model.checkpoint.format import parse_dtype

    checkpoint = Path(args.checkpoint) if args.checkpoint else prepare_default_model()
    in_flight = [int(n) for n in args.in_flight.split(",")]
    llm = LLM(checkpoint, max_num_seqs=max(in_flight), cpu_kernels=args.cpu_kernels,
              dtype=None if args.dtype == "auto" else parse_dtype(args.dtype))
    free = SamplingParams(temperature=0.8, seed=0, max_tokens=args.output_len, ignore_eos=True)
    constrained = SamplingParams(temperature=0.8, seed=0, max_tokens=args.output_len,
                                 structured_outputs=StructuredOutputsParams(json=schema(args.output_len)))
    clock = MaskClock(llm.engine.bitmasks)
    rows = []
    try:
        run(llm, constrained, 2)  # warm-up: compiles the grammar, builds llguidance's token tables
        for count in in_flight:
            for name, params in (("unconstrained", free), ("json_schema", constrained)):
                clock.times.clear()
                llm.engine.step_times = StepTimes()
                runs = [run(llm, params, count) for _ in range(args.repeats)]
                elapsed = statistics.median(r[0] for r in runs)
                tokens = runs[0][1]
                steps = llm.engine.step_times
                row = {"in_flight": count, "mode": name, "output_tokens": tokens, "runs_s": [round(r[0], 3) for r in runs],
                       "output_tokens_per_s": round(tokens / elapsed, 2),
                       "step_ms": round(1e3 * steps.total_s / steps.num_steps, 3),
                       "mask_ms_per_step": round(1e3 * statistics.mean(clock.times), 3) if clock.times else 0.0,
                       "mask_ms_max": round(1e3 * max(clock.times), 3) if clock.times else 0.0}
                rows.append(row)
                print(f"{count:3d} in flight, {name:13s}: {row['output_tokens_per_s']:8.1f} output tokens/s, "
                      f"step {row['step_ms']:.2f} ms, mask {row['mask_ms_per_step']:.3f} ms/step "
                      f"(max {row['mask_ms_max']:.3f})")
    finally:
        llm.shutdown()
    for count in in_flight:
        free_row, json_row = (r for r in rows if r["in_flight"] == count)
        json_row["throughput_vs_unconstrained"] = round(json_row["output_tokens_per_s"] / free_row["output_tokens_per_s"], 3)
    result = {
        "benchmark": "structured_outputs",
        **provenance("structured_outputs.py", argv),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({cpu_model()}, {os.cpu_count()} cores)",
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma"))),
        "dtype": str(llm.engine.config.dtype).removeprefix("torch."),
        "checkpoint": str(checkpoint),
        "setup": vars(args),
        "rows": rows,
    }
    if args.output_json:
        write_result(args.output_json, result)
    return result


if __name__ == "__main__":
    main()
