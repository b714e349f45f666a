"""`EngineClient`: the engine as the HTTP server sees it, and all the server may touch of it.

The model's limits, `tokenize`, `generate` (deltas), `abort`, `stats` and health. Every member
is safe to call from the HTTP thread while the engine thread steps: limits are fixed at start-up,
stats are a snapshot the engine thread publishes after each step, and requests travel through
`AsyncLLMEngine`'s inbox. A request is validated once, here (`tokenize`, `check_params`), before
`generate`, which hands it to the engine unchecked.
"""

from __future__ import annotations

from typing import AsyncIterator

from tpserve.engine.async_engine import AsyncLLMEngine
from tpserve.engine.config import EngineConfig
from tpserve.engine.executor import EngineDeadError
from tpserve.engine.llm_engine import EngineStats
from tpserve.engine.outputs import RequestOutput
from tpserve.engine.sampling_params import SamplingParams


__all__ = ["EngineClient", "EngineDeadError", "run_headless_rank"]


class EngineClient:
    def __init__(self, config: EngineConfig) -> None:
        self._engine = AsyncLLMEngine(config)
        engine = self._engine.engine
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.vocab_size
        self.max_num_seqs: int = config.max_num_seqs
        # The checkpoint's tokenizer, for chat templates and the text of single tokens.
        self.tokenizer = engine.tokenizer
        # The engine's own checks, which read only what is fixed at start-up.
        self._tokenize = engine.tokenize
        self._check_params = engine.check_params

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids; ValueError when it is empty, has ids outside the vocabulary, or
        leaves no room to generate."""
        return self._tokenize(prompt)

    def check_params(self, params: SamplingParams) -> None:
        """ValueError for settings the engine cannot run: n over max_num_seqs, token ids outside
        the vocabulary."""
        self._check_params(params)

    async def check_structured_outputs(self, params: SamplingParams) -> None:
        """ValueError when params.structured_outputs cannot be compiled (a bad schema, regex or
        grammar, or one that takes too long); compiled, it is cached for `generate`. Awaits the
        compilation on the compiler's threads, never on the event loop's or the engine's."""
        await self._engine.compile_grammar(params)

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
                 ) -> AsyncIterator[RequestOutput]:
        """The request's deltas (tpserve.engine.outputs), the last one with finished=True.
        `prompt_token_ids` come from `tokenize`, `params` passed `check_params`. Leaving the
        iteration early aborts the request. Raises EngineDeadError when the engine is dead."""
        return self._engine.deltas(None, prompt_token_ids, params, request_id)

    def abort(self, request_id: str) -> None:
        self._engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self._engine.stats

    @property
    def is_healthy(self) -> bool:
        return self._engine.is_healthy

    @property
    def error(self) -> str | None:
        """Why the engine stopped, once it has."""
        return self._engine.error

    def shutdown(self) -> None:
        self._engine.shutdown()


def run_headless_rank(config: EngineConfig) -> int:
    """Under torchrun, a rank other than global rank 0: join the group through torchrun's
    environment, take every setting from rank 0 and run its commands until it says SHUTDOWN. The
    exit code: 0 after SHUTDOWN, 1 after an error (a peer gone, a failed step)."""
    import os
    from datetime import timedelta

    from tpserve.engine.worker import RankStart, headless_main

    env = {name: int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return headless_main(RankStart(
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"], config.tensor_parallel_size,
        config.pipeline_parallel_size, config.device, "env://", timedelta(seconds=config.distributed_timeout),
    ))
