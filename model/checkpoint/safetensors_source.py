"""A `TensorSource` over a folder of safetensors files with an index: reads only the asked ranges.

safetensors files are memory-mapped; `get_slice(name)[a:b]` copies just the bytes of rows a..b
(or the strided bytes of columns a..b), so a rank's anonymous memory grows by its own shard
only. The file pages touched are page cache, which the kernel can drop.

Before anything is read, every file the index names is checked against its own header: a
missing file, a tensor absent from its file, or a file shorter than its header says (a
truncated copy) fails with the file and tensor named.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from tpserve.model.checkpoint.format import INDEX_FILE, CheckpointError

# The largest header safetensors itself accepts (100 MB); a bigger number means a corrupt file.
_MAX_HEADER = 100_000_000


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {tensor: {"dtype", "shape", "data_offsets"}}."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is truncated ({len(head)} bytes, no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path}: header length {n} is not plausible; the file is not safetensors")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    if len(raw) < n:
        raise CheckpointError(f"{path}: file is truncated inside its header ({len(raw)} of {n} bytes)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); the file is corrupt") from None
    header.pop("__metadata__", None)
    header["__data_start__"] = 8 + n
    return header


def check_file(path: Path, expected: Iterable[str]) -> dict:
    """The header of `path`, after checking it holds `expected` tensors and all their bytes."""
    header = read_header(path)
    data_start = header.pop("__data_start__")
    size = path.stat().st_size
    for name in expected:
        if name not in header:
            raise CheckpointError(f"{path}: tensor {name!r} is listed in {INDEX_FILE} but not in this file")
    for name, entry in header.items():
        end = data_start + entry["data_offsets"][1]
        if end > size:
            raise CheckpointError(
                f"{path}: file is truncated: tensor {name!r} ends at byte {end} but the file has {size} bytes; "
                f"copy or convert the checkpoint again"
            )
    return header


class SafetensorsSource:
    """Full tensors of a checkpoint folder, read lazily range by range."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_path = self.folder / INDEX_FILE
        try:
            index = json.loads(index_path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{index_path} is missing; the checkpoint is incomplete") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index_path} is not valid JSON: {e}") from None
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: 'weight_map' is missing or empty")
        self.weight_map: dict[str, str] = weight_map
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file, names in by_file.items():
            path = self.folder / file
            if not path.is_file():
                raise CheckpointError(
                    f"{path} is missing: {INDEX_FILE} puts tensor {names[0]!r} there ({len(names)} tensors in all); "
                    f"the checkpoint is incomplete, copy or convert it again"
                )
            header = check_file(path, names)
            for name in names:
                self._shapes[name] = tuple(header[name]["shape"])
        self._handles: dict[str, object] = {}

    def keys(self) -> Iterable[str]:
        return self.weight_map.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), framework="pt", device="cpu")
        return self._handles[file]

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        file = self.weight_map[name]
        try:
            handle = self._handle(file)
            if dim is None:
                return handle.get_tensor(name)
            index = [slice(None)] * len(self._shapes[name])
            index[dim] = slice(start, stop)
            return handle.get_slice(name)[tuple(index)]
        except Exception as e:  # safetensors raises its own error types; name the file and tensor
            raise CheckpointError(f"{self.folder / file}: reading tensor {name!r} failed: {e}") from e

    def close(self) -> None:
        self._handles.clear()  # safe_open handles unmap when collected
