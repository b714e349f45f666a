"""Megatron checkpoint -> tpserve checkpoint: Megatron-Core `torch_dist`, or legacy `mp_rank_XX`.

SRC may be a Megatron-LM save folder (with latest_checkpointed_iteration.txt), one iteration
folder, or a bare torch_dist folder. The model's hyperparameters come from the Megatron-LM args
stored in the checkpoint (a pickle: needs allow_pickle) or from `megatron_args`, a JSON file of the
same argument names. Megatron checkpoints carry no tokenizer: pass a Hugging Face tokenizer folder
as `tokenizer_dir` to bundle one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tpserve.model.checkpoint.format import CheckpointError
from tpserve.model.checkpoint.legacy_megatron import is_legacy, merge_legacy, read_rank_files, resolve_iteration
from tpserve.model.checkpoint.megatron_args import gpt_config_from_megatron_args, read_megatron_args_file
from tpserve.model.checkpoint.writer import save_checkpoint


def _stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    dtype = state["embedding.word_embeddings.weight"].dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def read_megatron(src: str | Path, allow_pickle: bool = False, megatron_args: str | Path | None = None,
                  vocab_size: int | None = None):
    """(GPTModelConfig, Megatron-named full tensors) of a Megatron checkpoint folder."""
    # torch.distributed.checkpoint takes ~1 s to import: only conversions pay for it, not workers.
    from tpserve.model.checkpoint.torch_dist import is_torch_dist, megatron_args_from_common, read_torch_dist, unstack_layers

    folder = resolve_iteration(Path(src))
    given = read_megatron_args_file(megatron_args) if megatron_args else None
    where = str(megatron_args) if megatron_args else f"{folder} (stored args)"
    if is_torch_dist(folder):
        tensors, common = read_torch_dist(folder, allow_pickle and given is None)
        args = given if given is not None else megatron_args_from_common(common, folder)
        config = gpt_config_from_megatron_args(args, where, vocab_size)
        state = unstack_layers(tensors, config.transformer.num_layers, folder)
    elif is_legacy(folder):
        states = read_rank_files(folder, allow_pickle)
        args = given if given is not None else states[0].get("args")
        if args is None:
            raise CheckpointError(f"{folder}: the checkpoint stores no args; give them with --megatron-args FILE")
        config = gpt_config_from_megatron_args(args, where, vocab_size)
        state = merge_legacy(states, config, folder)
    else:
        raise CheckpointError(
            f"{folder}: neither a torch_dist checkpoint (.metadata) nor a legacy one (mp_rank_00/); "
            f"point at a Megatron-LM save folder or one of its iter_XXXXXXX folders"
        )
    return config, state


def convert_megatron(
    src: str | Path,
    dst: str | Path,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    megatron_args: str | Path | None = None,
    vocab_size: int | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 2**30,
) -> Path:
    """Convert a Megatron checkpoint; dtype None keeps the stored one."""
    config, state = read_megatron(src, allow_pickle, megatron_args, vocab_size)
    return save_checkpoint(dst, config, state, tokenizer_dir=tokenizer_dir, dtype=dtype or _stored_dtype(state),
                           max_shard_bytes=max_shard_bytes)
