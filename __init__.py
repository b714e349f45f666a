"""tpserve: a tensor-parallel inference server for Megatron-style GPT models.

    from tpserve import LLM, SamplingParams
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use, so `import tpserve.model` does not pull in the engine.
    if name == "LLM":
        from tpserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from tpserve.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'tpserve' has no attribute {name!r}")
