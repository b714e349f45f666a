"""Hugging Face folder -> tpserve checkpoint.

A folder as `save_pretrained` writes it: config.json, the weights (model.safetensors, or shards
with model.safetensors.index.json; pytorch_model*.bin only with allow_pickle), and the tokenizer
files. The names and layouts are mapped by `hf.py` (GPT-2 and the Llama family).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open

from tpserve.model.checkpoint.format import CheckpointError, parse_dtype
from tpserve.model.checkpoint.hf import gpt_config_from_hf, megatron_state_dict_from_hf
from tpserve.model.checkpoint.pickle_files import load_pickle
from tpserve.model.checkpoint.safetensors_source import check_file
from tpserve.model.checkpoint.writer import save_checkpoint


class SafetensorsFiles(Mapping[str, torch.Tensor]):
    """Tensors of one or more safetensors files by name, read when asked for (not all at once)."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files  # tensor name -> file
        self._handles: dict[Path, object] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        try:
            return self._handles[file].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: reading tensor {name!r} failed: {e}") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def hf_weights(folder: Path, allow_pickle: bool = False) -> Mapping[str, torch.Tensor]:
    """The weights of a Hugging Face folder by HF name; every file checked against its header."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            if not (folder / file).is_file():
                raise CheckpointError(
                    f"{folder / file} is missing: {index.name} puts tensor {names[0]!r} there; the download is incomplete"
                )
            check_file(folder / file, names)
        return SafetensorsFiles({name: folder / file for name, file in weight_map.items()})
    single = folder / "model.safetensors"
    if single.is_file():
        return SafetensorsFiles({name: single for name in check_file(single, ())})
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        state: dict[str, torch.Tensor] = {}
        for file in bins:
            state |= load_pickle(file, allow_pickle)
        return state
    raise CheckpointError(
        f"{folder}: no weights found (model.safetensors, model.safetensors.index.json or pytorch_model*.bin)"
    )


def source_dtype(hf_config: dict, weights: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype the model was saved in: config.json's, else its first floating tensor's."""
    name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if isinstance(name, str) and name in ("float32", "float16", "bfloat16"):
        return parse_dtype(name)
    for tensor in map(weights.__getitem__, weights):
        if tensor.is_floating_point():
            return tensor.dtype if tensor.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return torch.float32


def read_hf_folder(folder: str | Path, allow_pickle: bool = False):
    """(GPTModelConfig, Megatron-named full tensors, the source dtype) of a Hugging Face folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} is missing: {folder} is not a Hugging Face model folder")
    hf_config = json.loads(config_path.read_text())
    try:
        config = gpt_config_from_hf(hf_config)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    weights = hf_weights(folder, allow_pickle)
    try:
        state = megatron_state_dict_from_hf(weights, config)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: {e}") from None
    return config, state, source_dtype(hf_config, weights)


def convert_hf(
    src: str | Path, dst: str | Path, dtype: torch.dtype | None = None, allow_pickle: bool = False,
    max_shard_bytes: int = 2**30,
) -> Path:
    """Convert a Hugging Face folder; dtype None keeps the source's."""
    config, state, stored = read_hf_folder(src, allow_pickle)
    return save_checkpoint(dst, config, state, tokenizer_dir=Path(src), dtype=dtype or stored,
                           max_shard_bytes=max_shard_bytes)
