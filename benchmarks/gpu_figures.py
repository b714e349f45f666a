"""The figures the GPU check exists for, read out of its steps' results, each beside its target.

The targets are the README's: batch-1 decode moves the weights at >= 75% of the measured copy
bandwidth (the bandwidth roofline), prefill attention runs at >= 300 TFLOP/s (FlashAttention-2
reaches ~335 on an H100), paged decode attention at >= 75% of copy bandwidth, and the engine's
host work is < 10% of a batch-64 step. A figure that is missing (its step failed) or measured on
the CPU (the dry run) is compared with nothing: `met` is None.
"""

from __future__ import annotations

# (name, figure's key in the summary, comparison, target)
TARGETS = [
    ("batch-1 decode, share of copy bandwidth", "decode_b1_of_copy_bw", ">=", 0.75),
    ("prefill attention TFLOP/s, 4k-16k tokens (lowest)", "prefill_TFLOPs_lowest", ">=", 300.0),
    ("paged decode attention, share of copy bandwidth (lowest)", "paged_decode_of_copy_bw_lowest", ">=", 0.75),
    ("engine host time, share of a batch-64 step", "engine_share_of_step", "<", 0.10),
]


def llama_weights(hf: dict) -> dict:
    """Parameter counts of a Llama-family Hugging Face config.json (no biases): all of them, and those
    a decode step reads whole (all but the input embedding table, of which a step reads one row per
    token; a tied table is read whole as the output layer). Llama-3-8B: 8,030,261,248 parameters."""
    h, ffn, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    n = hf["num_attention_heads"]
    g = hf.get("num_key_value_heads", n)
    d = hf.get("head_dim") or h // n
    vocab = hf["vocab_size"]
    tied = hf.get("tie_word_embeddings", False)
    per_layer = h * (n + 2 * g) * d + n * d * h + 3 * h * ffn + 2 * h  # qkv, proj, gate+up+down, two norms
    total = vocab * h + layers * per_layer + h + (0 if tied else vocab * h)
    return {"params": total, "params_read_per_step": total if tied else total - vocab * h,
            "kv_elements_per_token": 2 * layers * g * d}


def decode_roofline(run: dict, hf: dict, dtype_bytes: int, copy_gbps: float | None) -> dict:
    """A batch-1 throughput.py run as achieved bandwidth: the bytes one step must read (the weights,
    and the K/V of the average context) over the measured time of a step."""
    setup = run["setup"]
    weights = llama_weights(hf)
    context = setup["input_len"] + setup["output_len"] / 2
    step_bytes = dtype_bytes * (weights["params_read_per_step"] + weights["kv_elements_per_token"] * context)
    gbps = step_bytes / run["step_ms"] / 1e6
    return {"output_tokens_per_s": run["output_tokens_per_s"], "step_ms": run["step_ms"],
            "bytes_per_step": round(step_bytes), "GBps": round(gbps, 1),
            "of_copy_bw": round(gbps / copy_gbps, 3) if copy_gbps else None}


def kernel_figures(report: dict) -> dict:
    """kernel_speed.py's rows, cut down to what the targets and the README table need."""
    rows = report["results"]
    prefill = [{"seqlen": r["seqlen"], "paged_TFLOPs": round(r["paged"]["TFLOPs"], 1),
                "varlen_TFLOPs": round(r["varlen"]["TFLOPs"], 1),
                **{f"{k}_TFLOPs": round(v["TFLOPs"], 1) for k, v in r["baselines"].items() if "TFLOPs" in v}}
               for r in rows if r["kernel"] == "prefill"]
    decode = [{"batch": r["batch"], "context": r["context"], "GBps": round(r["GBps"], 1),
               "of_copy_bw": round(r["of_copy_bw"], 3),
               **{f"{k}_of_copy_bw": round(v["of_copy_bw"], 3) for k, v in r["baselines"].items() if "of_copy_bw" in v}}
              for r in rows if r["kernel"] == "decode"]
    memory_bound = [{"kernel": r["kernel"], "tokens": r["tokens"], "GBps": round(r["GBps"], 1),
                     "of_copy_bw": round(r["of_copy_bw"], 3)} for r in rows if r["kernel"] in ("rope", "store_kv")]
    return {"prefill_attention": prefill, "paged_decode": decode, "rope_and_store_kv": memory_bound}


def summarize(results: dict[str, dict], hf: dict, dtype_bytes: int, compare: bool) -> dict:
    """results: each finished step's result by step name. compare: False on the CPU (dry run)."""
    figures: dict = {}
    env = results.get("env", {})
    copy_gbps = env.get("copy_GBps")
    if env:
        figures["roofline"] = {k: env[k] for k in ("device", "copy_GBps", "matmul", "matmul_TFLOPs")}
    for mode in ("graphs", "eager"):
        if f"decode_b1_{mode}" in results:
            figures[f"decode_b1_{mode}"] = decode_roofline(results[f"decode_b1_{mode}"], hf, dtype_bytes, copy_gbps)
    if "decode_b1_graphs" in figures:
        figures["decode_b1_of_copy_bw"] = figures["decode_b1_graphs"]["of_copy_bw"]
        if "decode_b1_eager" in figures:  # what replaying CUDA graphs saves a batch-1 step
            figures["decode_b1_graphs_speedup"] = round(
                figures["decode_b1_eager"]["step_ms"] / figures["decode_b1_graphs"]["step_ms"], 2)
    if "kernels" in results:
        figures |= kernel_figures(results["kernels"])
        if figures["prefill_attention"]:
            figures["prefill_TFLOPs_lowest"] = min(r["paged_TFLOPs"] for r in figures["prefill_attention"])
        if figures["paged_decode"]:
            figures["paged_decode_of_copy_bw_lowest"] = min(r["of_copy_bw"] for r in figures["paged_decode"])
    if "throughput" in results:
        run = results["throughput"]
        figures["throughput"] = {k: run[k] for k in ("num_prompts", "output_tokens_per_s", "total_tokens_per_s",
                                                     "step_ms", "engine_ms_per_step", "engine_share_of_step")}
        figures["engine_share_of_step"] = run["engine_share_of_step"]
    if "serve" in results:
        figures["serve"] = {k: results["serve"][k] for k in ("startup_s", "ttft_ms", "usage", "done")}
    figures["targets"] = [
        {"name": name, "figure": figures.get(key), "target": f"{op} {target}",
         "met": None if not compare or figures.get(key) is None
         else (figures[key] >= target if op == ">=" else figures[key] < target)}
        for name, key, op, target in TARGETS
    ]
    return figures
