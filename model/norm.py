"""The normalization chosen by `TransformerConfig.normalization`.

Megatron-Core's local spec builds torch's own LayerNorm/RMSNorm here (its `WrappedTorchNorm`);
parameter names (`weight`, `bias`) match its state dicts.
"""

from __future__ import annotations

from torch import nn

from tpserve.model.config import TransformerConfig


class Norm:
    """A factory that looks like a module class to `build_module`."""

    def __new__(cls, config: TransformerConfig, hidden_size: int) -> nn.Module:
        if config.normalization == "LayerNorm":
            norm = nn.LayerNorm(hidden_size, eps=config.layernorm_epsilon, dtype=config.params_dtype)
        else:
            norm = nn.RMSNorm(hidden_size, eps=config.layernorm_epsilon, dtype=config.params_dtype)
        return norm.requires_grad_(False)
