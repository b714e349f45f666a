"""`ModuleSpec` and `build_module`, as in Megatron-Core: which class fills each slot of a layer.

A spec names classes directly (never import strings), so a layer spec is a plain, readable
tree of classes and their fixed arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class ModuleSpec:
    module: type[nn.Module]
    # Fixed keyword arguments for the module's constructor.
    params: dict[str, Any] = field(default_factory=dict)
    # The module's own submodules dataclass (e.g. SelfAttentionSubmodules), if it has one.
    submodules: Any = None


def build_module(spec: ModuleSpec | type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """Instantiate a spec (or a bare class) with the caller's arguments plus the spec's own."""
    if isinstance(spec, ModuleSpec):
        if spec.submodules is not None:
            kwargs["submodules"] = spec.submodules
        return spec.module(*args, **spec.params, **kwargs)
    return spec(*args, **kwargs)
