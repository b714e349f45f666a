"""Writing a tpserve checkpoint, atomically: a temporary folder beside the target, renamed at the end.

A crash, a bad tensor or Ctrl-C leaves no half-written checkpoint behind: either DST is complete
or it does not exist. Tensors are checked against the config (every name, every shape) before
a byte is written, so a converter bug surfaces here with the tensor named, not at serving time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import save_file

from tpserve.model.builder import GPTModelBuilder, GPTModelConfig
from tpserve.model.checkpoint.format import (
    CONFIG_FILE,
    INDEX_FILE,
    CheckpointError,
    TokenizerInfo,
    config_json,
    dtype_name,
)
from tpserve.model.checkpoint.load import check_weights
from tpserve.model.checkpoint.sources import DictSource
from tpserve.model.checkpoint.tokenizer import copy_tokenizer, tokenizer_info
from tpserve.model.parallel_state import ParallelState

# Tensors with one row per vocabulary entry; stored with the real vocabulary only.
VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def save_checkpoint(
    path: str | Path,
    config: GPTModelConfig,
    state: Mapping[str, torch.Tensor],
    *,
    tokenizer_dir: str | Path | None,
    dtype: torch.dtype,
    max_shard_bytes: int = 2**30,
    tokenizer: TokenizerInfo | None = None,
) -> Path:
    """Write `state` (full tensors, Megatron names) as a tpserve checkpoint at `path`.

    `tokenizer` overrides the facts read from `tokenizer_dir` (bos/eos ids, chat template).
    """
    path = Path(path)
    if path.exists():  # before the (slow) checks; atomic_folder checks again
        raise FileExistsError(f"{path} already exists; remove it or choose another destination")
    dtype_name(dtype)  # fail early on an unstorable dtype
    state = _checked_state(config, state)
    info = tokenizer or (tokenizer_info(tokenizer_dir) if tokenizer_dir else TokenizerInfo())

    with atomic_folder(path) as tmp:
        weight_map, total = write_shards(tmp, state, dtype, max_shard_bytes)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_dir:
            copy_tokenizer(Path(tokenizer_dir), tmp, info.chat_template)
        (tmp / CONFIG_FILE).write_text(json.dumps(config_json(config, dtype, info), indent=2) + "\n")
    return path


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path`, renamed to `path` if the block finishes, removed if not.

    Beside, not in /tmp: a rename is atomic only within one file system.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; remove it or choose another destination")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give it and its files the modes the umask allows,
    as if created normally, so a shared model cache stays readable."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def _checked_state(config: GPTModelConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with vocabulary padding dropped, after checking it against the model (TP 1)."""
    out = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if name in VOCAB_TENSORS and tensor.dim() == 2 and tensor.shape[0] > config.vocab_size:
            tensor = tensor[: config.vocab_size]  # padding rows are never looked up or sampled
        out[name] = tensor
    single = config.with_tensor_parallel_size(1)
    model = GPTModelBuilder(single).build_model(ParallelState(), device="meta")  # shapes only, no memory
    try:
        check_weights(model, DictSource(out), ParallelState())
    except ValueError as e:
        raise CheckpointError(f"the tensors do not fit the config: {e}") from None
    return out


def write_shards(
    folder: Path, state: dict[str, torch.Tensor], dtype: torch.dtype, max_shard_bytes: int
) -> tuple[dict[str, str], int]:
    """Greedy shards of at most max_shard_bytes (a larger tensor gets a file of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    itemsize = dtype.itemsize
    for name, tensor in state.items():
        nbytes = tensor.numel() * itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: _owned(state[n].detach().to("cpu", dtype).contiguous()) for n in names}
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map |= {n: file for n in names}
        del shard
    return weight_map, total


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that is its storage's only view: safetensors refuses tensors sharing memory
    (a truncated embedding, GPT-2's q/k/v chunks of one fused weight)."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor
