"""tpserve checkpoints: the format, loading a rank's shard, and converters into it.

    save_checkpoint(DIR, config, full_state, tokenizer_dir=..., dtype=torch.bfloat16)
    info = read_checkpoint_info(DIR)          # config, dtype, bos/eos ids, chat template
    model = load_model(DIR, parallel_state)   # this rank's GPTModel, only its slices read
"""

from tpserve.model.checkpoint.convert_gguf import convert_gguf
from tpserve.model.checkpoint.convert_hf import convert_hf
from tpserve.model.checkpoint.convert_megatron import convert_megatron
from tpserve.model.checkpoint.default_model import prepare_default_model
from tpserve.model.checkpoint.export_hf import export_hf
from tpserve.model.checkpoint.format import CheckpointError, CheckpointInfo, TokenizerInfo, read_checkpoint_info
from tpserve.model.checkpoint.writer import save_checkpoint

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
    # load_model is imported on first use (PEP 562): the loader builds the model, and whoever only
    # reads or converts checkpoints (the engine's host side, the converters) must not load it.
    if name == "load_model":
        from tpserve.model.checkpoint.loader import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
