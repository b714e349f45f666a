"""Checkpoint-test fixtures: the default model converted once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory):
    """SmolLM2-135M-Instruct converted from its GGUF by prepare_default_model (~20 s, once)."""
    from tpserve.model.checkpoint import prepare_default_model

    return prepare_default_model(tmp_path_factory.mktemp("cache"))
