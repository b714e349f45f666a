"""prepare_default_model: converts once, reuses a good folder, replaces one from an older format.

The conversion itself is replaced by a tiny model here (the real one runs in
test_smollm2_checkpoint.py); what is tested is the caching around it.
"""

from __future__ import annotations

import json

import torch
from helpers import converted, random_hf_model

from tpserve.model.checkpoint import default_model, read_checkpoint_info, save_checkpoint


def _fake_conversions(monkeypatch):
    calls = []
    config, state = converted(random_hf_model("llama_mha_tied"))

    def fake_convert(src, dst):
        calls.append(dst)
        return save_checkpoint(dst, config, state, tokenizer_dir=None, dtype=torch.float32)

    monkeypatch.setattr(default_model, "convert_gguf", fake_convert)
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: default_model.Path("SmolLM2.gguf"))
    return calls


def test_converted_once_then_reused(tmp_path, monkeypatch):
    calls = _fake_conversions(monkeypatch)
    first = default_model.prepare_default_model(tmp_path)
    assert first == tmp_path / "smollm2-135m-instruct" and len(calls) == 1
    assert default_model.prepare_default_model(tmp_path) == first and len(calls) == 1
    read_checkpoint_info(first)


def test_a_folder_from_an_older_format_is_converted_again(tmp_path, monkeypatch):
    calls = _fake_conversions(monkeypatch)
    folder = default_model.prepare_default_model(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | {"format_version": 0}))
    assert default_model.prepare_default_model(tmp_path) == folder and len(calls) == 2
    assert read_checkpoint_info(folder).config.vocab_size == 301


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model.default_cache_dir() == tmp_path / "tpserve"
