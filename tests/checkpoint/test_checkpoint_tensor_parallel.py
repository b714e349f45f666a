"""One checkpoint, written once, loaded by load_model at TP 1, 2 and 4: the same logits.

Each rank opens the safetensors files itself and reads only its rows or columns.
"""

from __future__ import annotations

import pytest
import torch
from ckpt_helpers import logits_of, save_hf_folder
from helpers import random_hf_model

from tpserve.model.checkpoint import load_model
from tpserve.model.checkpoint.convert_hf import convert_hf
from tpserve.model.launcher import RankContext
from tpserve.model.parallel_state import ParallelState

TOKENS = [[5, 9, 2, 77, 300, 41, 8, 3, 11, 12], [1, 200, 150, 12, 12, 12, 6, 0, 99, 98]]


def _load_and_run(ctx: RankContext, path, tokens):
    model = load_model(path, ctx.parallel_state, dtype=torch.float32, progress=False)
    local = sum(p.numel() for p in model.parameters())
    return logits_of(model, tokens), local


@pytest.fixture(scope="module", params=["gpt2", "llama_gqa"])
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf = random_hf_model(request.param)
    save_hf_folder(hf, root / "hf")
    # Small shards, so a rank's slices come from several files.
    path = convert_hf(root / "hf", root / "tp", max_shard_bytes=50_000)
    reference, total = _load_and_run(RankContext(ParallelState()), path, TOKENS)
    torch.testing.assert_close(reference, hf(torch.tensor(TOKENS)).logits, atol=1e-4, rtol=1e-4)
    return path, reference, total


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_same_logits_at_every_tp_size(checkpoint, tp, worker_groups):
    path, reference, total = checkpoint
    results = worker_groups.get(tp).run(_load_and_run, path, TOKENS)
    for rank, (logits, local) in enumerate(results):
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5, msg=lambda m: f"rank {rank} of {tp}: {m}")
        # Each rank holds a shard, not the whole model: norms are replicated, everything else split.
        assert local < total * 0.75
