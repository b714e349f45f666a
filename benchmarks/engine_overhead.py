"""The engine's own host time per step, alone: the workers' step is replaced by an instant
stand-in that samples random tokens, so what is timed is scheduling, building the plan and
applying the results (appending, detokenizing, stop checks), the work a GPU would wait on.

    python benchmarks/engine_overhead.py --batch 64 --output-len 256 [--stream] [--output-json r.json]

`--stream` takes every step's outputs as the server does (a delta for every request that
moved); without it, as `LLM.generate` does (folding the deltas into whole outputs).
"""

from __future__ import annotations

import argparse
import random
import time

from provenance import provenance, write_result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="tpserve checkpoint folder (default: the SmolLM2 default model); "
                                        "its tokenizer is what detokenizing costs")
    p.add_argument("--batch", type=int, default=64, help="requests, all running together")
    p.add_argument("--input-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--stream", action="store_true", help="every step's outputs, as the server takes them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", help="where to write the result (default: print only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from tpserve import LLM, SamplingParams
    from tpserve.engine.llm_engine import StepTimes
    from tpserve.engine.protocol import Sample, StepResult

    rng = random.Random(args.seed)
    llm = LLM(args.checkpoint, max_num_seqs=args.batch,
              max_num_batched_tokens=max(2048, args.batch * (args.input_len + 1)))
    vocab = llm.engine.vocab_size
    try:
        def instant_step(plan, bitmask=None) -> StepResult:  # no constrained request asks for a mask
            return StepResult(samples={s: [Sample(rng.randrange(vocab), None, []) for _ in range(n)]
                                       for s, n in zip(plan.seq_ids, plan.num_samples) if n})

        llm.engine.executor.execute = instant_step
        prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.batch)]
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        llm.engine.step_times = StepTimes()
        start = time.perf_counter()
        if args.stream:
            for i, prompt in enumerate(prompts):
                llm.engine.add_request(f"r{i}", prompt, params)
            while llm.engine.has_unfinished_requests():
                llm.engine.step()
        else:
            llm.generate(prompts, params)
        wall = time.perf_counter() - start
        steps = llm.engine.step_times
    finally:
        del llm.engine.executor.execute  # the real one again, for the workers' shutdown
        llm.shutdown()
    result = {
        "benchmark": "engine_overhead",
        **provenance("engine_overhead.py", argv),
        "setup": vars(args),
        "steps": steps.num_steps,
        "engine_ms_per_step": round(1e3 * steps.engine_s / steps.num_steps, 3),
        "wall_ms_per_step": round(1e3 * wall / steps.num_steps, 3),
    }
    print(f"batch {args.batch}, {args.output_len} output tokens{' (streaming)' if args.stream else ''}: "
          f"{steps.num_steps} steps, engine {result['engine_ms_per_step']:.3f} ms/step")
    if args.output_json:
        write_result(args.output_json, result)
    return result


if __name__ == "__main__":
    main()
