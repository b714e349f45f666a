"""`load_model`: one rank's GPTModel from a tpserve checkpoint, reading only that rank's slices."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from tpserve.model.builder import GPTModelBuilder, GPTModelConfig
from tpserve.model.checkpoint.format import CheckpointError, at_parallel_sizes, read_checkpoint_info
from tpserve.model.checkpoint.load import check_weights, load_parameter, param_shardings
from tpserve.model.checkpoint.safetensors_source import SafetensorsSource
from tpserve.model.core_attention import AttentionBackend
from tpserve.model.dtype import default_dtype
from tpserve.model.parallel_state import ParallelState

if TYPE_CHECKING:
    from tpserve.model.gpt_model import GPTModel


def serving_config(
    config: GPTModelConfig, ps: ParallelState, dtype: torch.dtype, parallel_output: bool,
    where: Path | str = "checkpoint",
) -> GPTModelConfig:
    """The stored config set up for serving at `ps`'s parallel sizes in `dtype`."""
    transformer = dataclasses.replace(config.transformer, params_dtype=dtype)
    config = dataclasses.replace(config, transformer=transformer, parallel_output=parallel_output)
    return at_parallel_sizes(config, ps.tensor_model_parallel_size, ps.pipeline_model_parallel_size, where)


def load_model(
    path: str | Path,
    parallel_state: ParallelState = ParallelState(),
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    attention_backend: AttentionBackend | None = None,
    parallel_output: bool = False,
    progress: bool = True,
    random_weights: bool = False,
) -> GPTModel:
    """This rank's model, its parameters filled from the checkpoint at `path`.

    dtype None means the device's default (`default_dtype`), whatever the stored dtype; tensors
    are converted as they are read. parallel_output=False gathers the logits on every rank.
    random_weights: only the checkpoint's config.json is read and the parameters are drawn at
    random on the device (`fill_random_weights`), for benchmarks of models too large to ship.
    """
    info = read_checkpoint_info(path, require_weights=not random_weights)
    dtype = dtype or default_dtype(device)
    config = serving_config(info.config, parallel_state, dtype, parallel_output, info.path)
    model = GPTModelBuilder(config).build_model(parallel_state, device, attention_backend)
    if random_weights:
        return fill_random_weights(model, seed=parallel_state.rank)
    source = SafetensorsSource(info.path)  # checks every shard file against the index first
    try:
        check_weights(model, source, parallel_state)
    except ValueError as e:
        raise CheckpointError(f"{info.path}: {e}") from None
    params = param_shardings(model)
    show = progress and parallel_state.rank == 0
    for key, (param, sharding) in tqdm(params.items(), desc=f"loading {info.path.name}", unit="tensor",
                                       disable=not show, leave=False):
        load_parameter(source, key, param, sharding, parallel_state)
    source.close()
    return model


@torch.no_grad()
def fill_random_weights(model: GPTModel, seed: int = 0, std: float = 0.02) -> GPTModel:
    """Every parameter drawn on its own device ("dummy" weights, as vLLM calls them): matrices
    and embeddings N(0, std), norm weights 1, biases 0. The outputs mean nothing; the shapes,
    dtypes and the work per token are the real model's."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1:  # norm weights
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generator)
    return model
