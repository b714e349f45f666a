"""tpserve: a tensor-parallel inference server for Megatron-style GPT models."""

__version__ = "0.1.0"
