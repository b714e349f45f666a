"""tpserve checkpoints: the format, loading a rank's shard, and converters into it.

    save_checkpoint(DIR, config, full_state, tokenizer_dir=..., dtype=torch.bfloat16)
    info = read_checkpoint_info(DIR)          # config, dtype, bos/eos ids, chat template
    model = load_model(DIR, parallel_state)   # this rank's GPTModel, only its slices read
"""

import importlib

# Each name is imported on first use (PEP 562), so reading a checkpoint's format does not load
# the converters, or the model through the loader.
_MODULES = {
    "CheckpointError": "format",
    "CheckpointInfo": "format",
    "TokenizerInfo": "format",
    "convert_gguf": "convert_gguf",
    "convert_hf": "convert_hf",
    "convert_megatron": "convert_megatron",
    "export_hf": "export_hf",
    "load_model": "loader",
    "prepare_default_model": "default_model",
    "read_checkpoint_info": "format",
    "save_checkpoint": "writer",
}

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "TokenizerInfo",
    "convert_gguf",
    "convert_hf",
    "convert_megatron",
    "export_hf",
    "load_model",
    "prepare_default_model",
    "read_checkpoint_info",
    "save_checkpoint",
]


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
