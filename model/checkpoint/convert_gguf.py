"""GGUF file -> tpserve checkpoint: weights dequantized by `gguf.py`, tokenizer rebuilt by transformers.

The tokenizer lives in the GGUF metadata (vocabulary, merges, special ids, chat template).
transformers' own GGUF tokenizer conversion turns it into a `tokenizer.json`; saving that with
`save_pretrained` gives files that `AutoTokenizer.from_pretrained(checkpoint)` loads and that
encode exactly as `AutoTokenizer.from_pretrained(dir, gguf_file=name)` does (tested on a
corpus). Weights are dequantized to float32, so the default stored dtype is float32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tpserve.model.checkpoint.format import CheckpointError
from tpserve.model.checkpoint.gguf import read_gguf
from tpserve.model.checkpoint.hf import gpt_config_from_hf, megatron_state_dict_from_hf
from tpserve.model.checkpoint.writer import save_checkpoint


def save_gguf_tokenizer(path: Path, folder: Path) -> None:
    """Write the GGUF's tokenizer as Hugging Face tokenizer files into `folder`."""
    import transformers  # slow to import; only conversions need it

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises many types for an unsupported tokenizer
        raise CheckpointError(f"{path}: transformers cannot rebuild the tokenizer from the GGUF metadata: {e}") from e
    tokenizer.save_pretrained(str(folder))


def convert_gguf(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None,
                 max_shard_bytes: int = 2**30) -> Path:
    """Convert a GGUF file (llama or gpt2 architecture); dtype None stores float32, as dequantized."""
    src = Path(src)
    if not src.is_file():
        raise CheckpointError(f"{src}: no such GGUF file")
    model = read_gguf(src)
    config = gpt_config_from_hf({"model_type": model.architecture, **model.hf_config})
    state = megatron_state_dict_from_hf(model.state_dict, config)
    del model  # the HF-named tensors not reused by `state` (q/k/v, gate/up) can go
    with tempfile.TemporaryDirectory(prefix="tpserve-gguf-tokenizer-") as tokenizer_dir:
        save_gguf_tokenizer(src, Path(tokenizer_dir))
        return save_checkpoint(dst, config, state, tokenizer_dir=Path(tokenizer_dir),
                               dtype=dtype or torch.float32, max_shard_bytes=max_shard_bytes)
