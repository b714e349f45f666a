"""`LLM`: offline generation, as vLLM users know it.

    llm = LLM("checkpoints/my-model", tensor_parallel_size=2, pipeline_parallel_size=2)
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outputs[0].outputs[0].text)
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence as Seq

from tpserve.engine.config import EngineConfig
from tpserve.engine.llm_engine import LLMEngine
from tpserve.engine.outputs import RequestOutput
from tpserve.engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, checkpoint: str | Path | None = None, tensor_parallel_size: int = 1, **engine_args) -> None:
        """`checkpoint`: a tpserve checkpoint folder; None serves the default model (SmolLM2-135M-Instruct,
        converted on first use). `engine_args`: the other fields of `EngineConfig`."""
        if checkpoint is None:
            from tpserve.model.checkpoint import prepare_default_model

            checkpoint = prepare_default_model()
        self.engine = LLMEngine(EngineConfig(checkpoint, tensor_parallel_size, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in the order of the prompts. A prompt is text or a list of token ids."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if not isinstance(params, SamplingParams) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        for request_id, prompt, p in zip(ids, prompts, params_list):
            self.engine.add_request(request_id, prompt, p)
        whole: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                output = whole.get(delta.request_id)
                if output is None:
                    whole[delta.request_id] = RequestOutput.start(delta)
                else:
                    output.add(delta)
        return [whole[i] for i in ids]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
