"""How the engine picks its CPU dtype and linear kernels: `dtype=None` by the CPU's flags, and
`cpu_kernels="auto"` timed once by rank 0, cached, and then what the model actually runs."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import build, converted, random_hf_model
from test_llm_engine import GREEDY, hf_greedy, make_engine, prompts, run

from tpserve.engine.config import EngineConfig
from tpserve.engine.protocol import WorkerConfig
from tpserve.engine.worker import bind_cpu_linear_kernels
from tpserve.kernels import cpu_info, cpu_linear
from tpserve.kernels.cpu_linear import CANDIDATES, Candidate
from tpserve.kernels.cpu_tuning import Entry, TuningKey
from tpserve.model.dtype import default_dtype
from tpserve.model.parallel_state import ParallelState


@pytest.mark.parametrize("flags, dtype", [
    ({"avx2", "fma"}, torch.float32),
    ({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16),
    ({"avx2", "avx512f", "amx_tile", "amx_bf16"}, torch.bfloat16),
    (set(), torch.float32),
])
def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(flags, dtype, monkeypatch):
    assert default_dtype("cpu", frozenset(flags)) == dtype
    monkeypatch.setattr(cpu_info, "cpu_flags", lambda: frozenset(flags))
    assert EngineConfig("unused", device="cpu").dtype == dtype
    assert EngineConfig("unused", device="cpu", dtype=torch.float16).dtype == torch.float16
    assert default_dtype("cuda", frozenset(flags)) == torch.bfloat16


def test_an_unknown_kernel_name_is_refused():
    with pytest.raises(ValueError, match="cpu_kernels='mkl' must be 'auto' or one of"):
        EngineConfig("unused", device="cpu", cpu_kernels="mkl")


def _worker_config(**fields) -> WorkerConfig:
    return WorkerConfig(checkpoint="unused", tensor_parallel_size=1, pipeline_parallel_size=1, init_method="", device="cpu", dtype=torch.float32,
                        block_size=16, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64,
                        kv_cache_memory=None, gpu_memory_utilization=0.9, eos_token_ids=[], **fields)


def test_the_choice_in_the_cache_is_the_kernel_the_model_runs(tmp_path, monkeypatch):
    """A made-up timing table in the cache (mm_t for one token, native for more, for every
    layer): the worker binds it without timing anything, and a forward calls those kernels."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = build(*converted(random_hf_model("llama_gqa")))
    config = _worker_config()
    shapes = model.cpu_linear_shapes(config.max_num_batched_tokens, config.max_num_seqs)
    assert len({(s.n, s.k) for s in shapes}) == 5  # qkv, proj, fc1, fc2, output
    key = TuningKey.here(torch.float32, torch.get_num_threads())
    entries = {f"{s.n}x{s.k}@{b}": dataclasses.asdict(Entry("mm_t" if b == 1 else "native", {}, {}))
               for s in shapes for b in cpu_linear.buckets_up_to(s.max_tokens)}
    path = key.file(tmp_path / "tpserve")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": dataclasses.asdict(key), "entries": entries}))

    calls = []
    for name, cand in list(CANDIDATES.items()):
        def spy(x, w, b=None, name=name, fn=cand.fn):
            calls.append((name, x.shape[0]))
            return fn(x, w, b)
        monkeypatch.setitem(cpu_linear.CANDIDATES, name, Candidate(spy, cand.dtypes))

    summary, _ = bind_cpu_linear_kernels(config, model, ParallelState())
    assert summary.startswith("CPU linear kernels: ") and "from the cache" in summary
    layers = len(model.linear_layers())
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), torch.arange(3)[None])  # 3 tokens: bucket 4
    assert calls == [("native", 3)] * layers
    calls.clear()
    with torch.no_grad():
        model(torch.tensor([[5]]), torch.arange(1)[None])
    assert calls == [("mm_t", 1)] * layers


def test_a_pinned_kernel_is_used_without_timing(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = build(*converted(random_hf_model("gpt2")))
    assert bind_cpu_linear_kernels(_worker_config(cpu_kernels="mm_t"), model, ParallelState()) is None
    assert {m.cpu_kernels.choices[1] for m in model.linear_layers()} == {"mm_t"}
    assert not (tmp_path / "tpserve").exists()
    x = torch.randn(5, model.config.hidden_size)
    layer = model.decoder.layers[0].mlp.linear_fc1
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tp", [1, 2])
def test_auto_times_once_per_machine_and_serves_the_reference_tokens(random_ckpt, tmp_path, monkeypatch, caplog, tp):
    """Rank 0 times the kernels into the cache at the first start; the second start reads them."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the workers inherit it
    caplog.set_level(logging.INFO, logger="tpserve.engine.llm_engine")
    summaries = []
    for _ in range(2):
        caplog.clear()
        engine = make_engine(random_ckpt[0], cpu_kernels="auto", tensor_parallel_size=tp)
        try:
            outs = run(engine, [(p, GREEDY) for p in prompts(4)])
        finally:
            engine.shutdown()
        summaries += [r.getMessage() for r in caplog.records if r.getMessage().startswith("CPU linear kernels")]
        for prompt, out in zip(prompts(4), outs):
            reference, trusted = hf_greedy(random_ckpt[1], prompt, 16)
            assert out.outputs[0].token_ids[:trusted] == reference[:trusted]
    assert len(summaries) == 2
    assert "timed in" in summaries[0] and "0 left to F.linear" in summaries[0]
    assert "from the cache" in summaries[1]
    assert len(list((tmp_path / "tpserve" / "cpu_linear").glob("*.json"))) == 1
