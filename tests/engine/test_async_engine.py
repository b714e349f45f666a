"""AsyncLLMEngine: streaming, aborting, a worker that dies, and a clean shutdown (TP 2)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from helpers import ENGINE_PINS

from tpserve.engine.async_engine import AsyncLLMEngine
from tpserve.engine.config import EngineConfig
from tpserve.engine.executor import EngineDeadError
from tpserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"  # a zombie has exited


def start(path, tp: int = 2) -> AsyncLLMEngine:
    return AsyncLLMEngine(EngineConfig(path, tensor_parallel_size=tp, kv_cache_memory=8 << 20, max_model_len=128,
                                       **ENGINE_PINS))


async def collect(engine, prompt, params, request_id=None):
    outs = [out async for out in engine.generate(prompt, params, request_id)]
    return outs


def test_streams_abort_and_shutdown(random_ckpt):
    engine = start(random_ckpt[0])
    pids = engine.engine.executor.pids
    try:
        async def main():
            greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
            streams = await asyncio.gather(*(collect(engine, [5 + i, 6, 7], greedy) for i in range(8)))
            for outs in streams:
                texts = [o.outputs[0].text for o in outs]
                assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative
                assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 10
            # The same request alone gives the same tokens as inside the batch of 8.
            alone = await collect(engine, [5, 6, 7], greedy)
            assert alone[-1].outputs[0].token_ids == streams[0][-1].outputs[0].token_ids
            # A client that stops reading mid-stream aborts its request; its blocks come back.
            async for out in engine.generate([9, 9, 9], SamplingParams(max_tokens=100, ignore_eos=True)):
                if len(out.outputs[0].token_ids) >= 3:
                    break
            for _ in range(100):
                if engine.engine.block_manager.num_free_blocks == engine.engine.block_manager.num_blocks:
                    break
                await asyncio.sleep(0.05)
            assert engine.engine.block_manager.num_free_blocks == engine.engine.block_manager.num_blocks
            assert not engine.engine.has_unfinished_requests()
            with pytest.raises(ValueError, match="prompt is empty"):
                await collect(engine, "", greedy)
            # An abort from elsewhere (a timeout, an admin) ends a reader's stream, not hangs it.
            outs = []
            async for out in engine.generate([8, 8], SamplingParams(max_tokens=1000, ignore_eos=True), "victim"):
                outs.append(out)
                if len(outs) == 2:
                    engine.abort("victim")
            assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"

        asyncio.run(main())
    finally:
        engine.shutdown()
    time.sleep(0.2)
    assert not any(pid_alive(p) for p in pids), "a worker outlived shutdown"


def test_a_killed_worker_fails_requests_fast(random_ckpt):
    engine = start(random_ckpt[0])
    pids = engine.engine.executor.pids
    try:
        async def main():
            params = SamplingParams(max_tokens=10)
            long = SamplingParams(temperature=1.0, max_tokens=120, ignore_eos=True)
            tasks = [asyncio.create_task(collect(engine, [3, 4, 5 + i], long)) for i in range(4)]
            first = engine.generate([1, 2, 3], long)
            await first.__anext__()  # generation is under way
            os.kill(pids[1], signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(EngineDeadError, match="worker 1 died"):
                async for _ in first:
                    pass
            for task in tasks:
                with pytest.raises(EngineDeadError):
                    await task
            assert time.monotonic() - killed_at < 5.0
            started = time.monotonic()
            with pytest.raises(EngineDeadError):
                await collect(engine, [1, 2], params)
            assert time.monotonic() - started < 0.5  # later requests fail fast
            assert not engine.is_healthy

        asyncio.run(main())
        time.sleep(0.2)
        assert not any(pid_alive(p) for p in pids), "the surviving rank was not killed"
    finally:
        engine.shutdown()
