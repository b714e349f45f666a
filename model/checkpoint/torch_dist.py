"""Megatron-Core `torch_dist` checkpoints, read with torch.distributed.checkpoint (no Megatron import).

Megatron-Core's `dist_checkpointing.save` writes a PyTorch Distributed Checkpoint: `.metadata`,
`__R_N.distcp` files and `metadata.json`. Whatever TP it was saved at, each tensor is stored
whole, in the layout tpserve stores (linear_qkv grouped per query group, gated fc1 all gate rows
then all up rows). Two differences, undone here:

- the layers are stacked: `decoder.layers.self_attention.linear_qkv.weight` is [num_layers, ...],
  and a MoE layer's experts too: `decoder.layers.mlp.experts.experts.linear_fc1.weight` is
  [num_layers, num_experts, ...];
- norms fused into the next linear carry Transformer Engine names even for a local-spec model:
  `linear_qkv.layer_norm_weight` is the input layernorm, `linear_fc1.layer_norm_weight` the
  pre-MLP layernorm (`_bias` likewise).

Non-tensor state (the Megatron-LM args among it) is one pickled object, `common_state`, read only
with allow_pickle; `_extra_state` entries (Transformer Engine FP8 metadata) are skipped.

The `.metadata` file is itself a pickle, which torch's FileSystemReader reads with plain
`pickle.load`. `SafeReader` reads it with an unpickler that builds only checkpoint-metadata
classes, torch dtypes and sizes, and refuses anything else, as `torch.load(weights_only=True)`
does; the tensors in the .distcp files torch already reads with weights_only=True.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata

from tpserve.model.checkpoint.format import CheckpointError
from tpserve.model.checkpoint.pickle_files import PICKLE_WARNING, load_pickle

# Transformer Engine names (fused norm + linear) -> Megatron-Core local names, per layer.
_TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
_PER_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _METADATA_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type):  # dataclasses and enums only, no functions
                return found
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        elif (module, name) in (("torch.serialization", "_get_layout"), ("collections", "OrderedDict")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"global {module}.{name} is not allowed in torch_dist metadata (only checkpoint metadata classes are)"
        )


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose .metadata is read by the restricted unpickler above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError) as e:
                raise CheckpointError(f"{path}: {e}") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def is_torch_dist(folder: Path) -> bool:
    return (folder / ".metadata").is_file()


def _model_key(key: str) -> str | None:
    """The model-relative name of a checkpoint key, or None for optimizer, RNG or extra state."""
    if "_extra_state" in key:
        return None
    key = key.removeprefix("model.")
    return key if key.startswith(_MODEL_PREFIXES) else None


def read_torch_dist(folder: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(model tensors by stored name, stacked as stored; the common state or None if not read)."""
    folder = Path(folder)
    if not is_torch_dist(folder):
        raise CheckpointError(f"{folder / '.metadata'} is missing: {folder} is not a torch_dist checkpoint")
    reader = SafeReader(str(folder))
    try:
        metadata = reader.read_metadata()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{folder / '.metadata'} cannot be read: {e}") from e
    state: dict[str, Any] = {}
    common_key = None
    for key, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata) and _model_key(key):
            state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
        elif isinstance(meta, BytesStorageMetadata) and key.startswith("common_state") and allow_pickle:
            common_key = key
            state[key] = io.BytesIO()
    _check_files(folder, metadata, state)
    if not any(_model_key(k) for k in state):
        raise CheckpointError(f"{folder}: no model tensors (embedding.*, decoder.*, output_layer.*) in the checkpoint")
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, no_dist=True)
    except Exception as e:  # a missing or short .distcp file surfaces here
        raise CheckpointError(f"{folder}: reading the .distcp files failed ({type(e).__name__}: {e}); "
                              f"is a file missing or truncated?") from e
    common = None
    if common_key is not None:
        # dcp's planner has already unpickled the bytes (allow_pickle was given); Megatron-Core
        # wraps the common state dict in a one-element list.
        common = state.pop(common_key)
        if isinstance(common, list) and len(common) == 1:
            common = common[0]
    elif (folder / "common.pt").is_file() and allow_pickle:  # older Megatron-Core: a file of its own
        common = load_pickle(folder / "common.pt", allow_pickle)
    return {_model_key(k): v for k, v in state.items()}, common


def _check_files(folder: Path, metadata: Metadata, wanted: dict) -> None:
    """Every .distcp byte range the wanted entries need must exist: name the file and tensor if not."""
    sizes: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in wanted:
            continue
        path = folder / info.relative_path
        if info.relative_path not in sizes:
            if not path.is_file():
                raise CheckpointError(f"{path} is missing: it holds (part of) tensor {index.fqn!r}; copy the checkpoint again")
            sizes[info.relative_path] = path.stat().st_size
        if info.offset + info.length > sizes[info.relative_path]:
            raise CheckpointError(
                f"{path}: file is truncated: tensor {index.fqn!r} needs bytes up to {info.offset + info.length}, "
                f"the file has {sizes[info.relative_path]}"
            )


def megatron_args_from_common(common: dict[str, Any] | None, folder: Path):
    """The Megatron-LM args stored in the common state; a clear error where there are none."""
    if common is None:
        raise CheckpointError(
            f"{folder}: the model's hyperparameters are stored as Megatron-LM args in the pickled common "
            f"state; {PICKLE_WARNING}, or give them as JSON with --megatron-args FILE"
        )
    if common.get("args") is None:
        raise CheckpointError(f"{folder}: the common state has no 'args'; give them with --megatron-args FILE")
    return common["args"]


def unstack_layers(tensors: dict[str, torch.Tensor], num_layers: int, folder: Path) -> dict[str, torch.Tensor]:
    """Stacked `decoder.layers.X` [L, ...] -> `decoder.layers.{i}.X`, TE norm names -> local ones,
    and a MoE layer's stacked experts `mlp.experts.experts.X` [E, ...] -> `mlp.experts.local_experts.{e}.X`."""
    out = {}
    for key, tensor in tensors.items():
        if _PER_LAYER.match(key):  # already per layer (older layouts, and models mixing dense and MoE layers)
            i, rest = _PER_LAYER.match(key).groups()
            out |= _layer_tensors(int(i), rest, tensor)
        elif key.startswith("decoder.layers."):
            rest = key.removeprefix("decoder.layers.")
            if tensor.shape[0] != num_layers:
                raise CheckpointError(
                    f"{folder}: tensor {key!r} stacks {tensor.shape[0]} layers but the args say num_layers={num_layers}"
                )
            for i in range(num_layers):
                out |= _layer_tensors(i, rest, tensor[i])
        else:
            out[key] = tensor
    return out


def _layer_tensors(layer: int, rest: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    if rest.startswith("mlp.experts.experts."):
        name = rest.removeprefix("mlp.experts.experts.")
        return {f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{name}": tensor[e] for e in range(tensor.shape[0])}
    return {f"decoder.layers.{layer}.{_TE_NORMS.get(rest, rest)}": tensor}
