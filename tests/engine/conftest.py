"""Engines on a small random checkpoint, started once per module (a start spawns workers)."""

from __future__ import annotations

import pytest
from helpers import random_checkpoint


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory):
    """(checkpoint path, the Hugging Face model it holds): Llama, 4 heads / 2 groups, vocab 300."""
    return random_checkpoint(tmp_path_factory.mktemp("random_ckpt"))
