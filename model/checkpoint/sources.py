"""Where full tensors come from when a rank loads its shard: anything that can read a range.

A source is asked for a slice along one dimension, so a lazy file-backed source (safetensors'
`get_slice`) reads only the bytes this rank owns; an in-memory state dict is the simplest source.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Protocol

import torch


class TensorSource(Protocol):
    def keys(self) -> Iterable[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """The whole tensor if `dim` is None, else its [start, stop) range along `dim`."""
        ...


class DictSource:
    """A state dict of full tensors held in memory."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.state_dict = state_dict

    def keys(self) -> Iterable[str]:
        return self.state_dict.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state_dict[name].shape)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        tensor = self.state_dict[name]
        return tensor if dim is None else tensor.narrow(dim, start, stop - start)
