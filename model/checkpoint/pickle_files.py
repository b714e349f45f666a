"""Reading pickled checkpoints (torch.save files), only when the user asked for it.

A pickle can run any code while it is being read: a checkpoint from an untrusted source could
take over the machine. Megatron-LM's model_optim_rng.pt and common.pt files store the training
arguments as an argparse.Namespace and RNG states as numpy objects, which the restricted
`weights_only` reader refuses, so they can only be read as full pickles. tpserve therefore
reads none unless told to (`allow_pickle=True`, `--allow-pickle` on the command line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tpserve.model.checkpoint.format import CheckpointError

PICKLE_WARNING = (
    "reading it runs arbitrary code stored in the file; if you trust its source, pass --allow-pickle "
    "(allow_pickle=True)"
)


def load_pickle(path: Path, allow_pickle: bool) -> Any:
    """torch.load of a trusted file, memory-mapped (tensors are paged in as they are used)."""
    if not allow_pickle:
        raise CheckpointError(f"{path} is a pickle file; {PICKLE_WARNING}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:
        # Files written with the legacy (non-zip) serialization cannot be memory-mapped.
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
