"""Filling one rank's model from full tensors: each rank reads only the ranges it owns.

Every parameter is checked before anything is read: a missing tensor, a tensor the model has
no place for, or a shape that does not fit fails with the tensor's name and both shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from tpserve.model.checkpoint.sources import TensorSource
from tpserve.model.parallel_state import ParallelState
from tpserve.model.tensor_parallel.sharding import REPLICATED, TensorSharding


def _expected_full_shape(local: tuple[int, ...], sharding: TensorSharding, world_size: int) -> tuple[int, ...]:
    if sharding.dim is None:
        return local
    full = list(local)
    full[sharding.dim] = local[sharding.dim] * world_size
    return tuple(full)


def _shape_fits(stored: tuple[int, ...], expected: tuple[int, ...], sharding: TensorSharding) -> bool:
    if len(stored) != len(expected):
        return False
    for dim, (s, e) in enumerate(zip(stored, expected)):
        if dim == sharding.dim and sharding.valid is not None:
            # A vocabulary tensor may be stored unpadded or padded; it must hold the real rows.
            if s < sharding.valid:
                return False
        elif s != e:
            return False
    return True


def param_shardings(model: nn.Module) -> dict[str, tuple[nn.Parameter, TensorSharding]]:
    """Every parameter of the model by its checkpoint name (the whole model's: a pipeline
    stage's layers have their global numbers), with how it is cut from the full tensor."""
    checkpoint_key = getattr(model, "checkpoint_key", lambda name: name)
    out = {}
    for module_name, module in model.named_modules():
        sharding_of = getattr(module, "sharding", None)  # the tensor-parallel layers define it
        for name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{name}" if module_name else name
            out[checkpoint_key(key)] = (param, sharding_of(name) if sharding_of else REPLICATED)
    return out


def check_weights(model: nn.Module, source: TensorSource, parallel_state: ParallelState) -> None:
    """Fail, naming every tensor at fault, unless `source` holds exactly what `model` needs."""
    params = param_shardings(model)
    stored = set(source.keys())
    problems = []
    missing = sorted(set(params) - stored)
    if missing:
        problems.append(f"missing tensors: {missing}")
    elsewhere = getattr(model, "held_by_another_stage", lambda key: False)
    unexpected = sorted(k for k in stored - set(params) if not elsewhere(k))
    if unexpected:
        problems.append(f"tensors the model has no parameter for: {unexpected}")
    for key, (param, sharding) in params.items():
        if key not in stored:
            continue
        expected = _expected_full_shape(tuple(param.shape), sharding, parallel_state.tensor_model_parallel_size)
        if not _shape_fits(source.shape(key), expected, sharding):
            problems.append(f"{key}: stored shape {list(source.shape(key))}, the model needs {list(expected)}")
    if problems:
        raise ValueError("weights do not fit the model:\n  " + "\n  ".join(problems))


def load_weights(model: nn.Module, source: TensorSource, parallel_state: ParallelState) -> None:
    """Copy this rank's shard of every parameter from `source` (full tensors, Megatron names)."""
    check_weights(model, source, parallel_state)
    for key, (param, sharding) in param_shardings(model).items():
        load_parameter(source, key, param, sharding, parallel_state)


@torch.no_grad()
def load_parameter(
    source: TensorSource, key: str, param: torch.Tensor, sharding: TensorSharding, ps: ParallelState
) -> None:
    """Fill `param` (this rank's shard) from the full tensor `key`, reading only the owned ranges.

    Each range is copied straight into its place in the parameter, so at most one range is held
    in memory besides the parameter itself (no concatenated copy of the whole shard).
    """
    if sharding.dim is None:
        param.copy_(source.read(key))
        return
    dim = sharding.dim
    offset = 0
    for piece in sharding.pieces(param.shape[dim], ps.tensor_model_parallel_rank, ps.tensor_model_parallel_size):
        rows = piece.stop - piece.start
        if rows > 0:
            param.narrow(dim, offset, rows).copy_(source.read(key, dim, piece.start, piece.stop))
        if piece.pad:
            param.narrow(dim, offset + rows, piece.pad).zero_()
        offset += rows + piece.pad
