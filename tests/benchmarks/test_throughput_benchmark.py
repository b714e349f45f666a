"""benchmarks/throughput.py with random weights: an architecture given as a Hugging Face
config.json runs without a checkpoint (how an 8B-shaped model is benchmarked on a GPU, where no
large checkpoint can travel), and the engine's "dummy" load draws every parameter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import throughput  # noqa: E402

from tpserve.model.checkpoint.format import read_checkpoint_info  # noqa: E402
from tpserve.model.checkpoint.loader import load_model  # noqa: E402

TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 256, "vocab_size": 70000,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": [69998, 69999], "rope_theta": 50000.0,
}


@pytest.fixture
def hf_config(tmp_path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return path


def test_a_config_only_checkpoint_loads_with_random_weights(hf_config, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    assert throughput.config_only_checkpoint(hf_config, folder) == folder
    info = read_checkpoint_info(folder, require_weights=False)
    assert info.config.vocab_size == 70000 and info.config.transformer.num_query_groups == 4
    assert info.eos_token_ids == (69998, 69999) and info.has_tokenizer
    with pytest.raises(ValueError, match="index.json is missing"):
        read_checkpoint_info(folder)  # weights are required unless asked otherwise
    model = load_model(folder, random_weights=True, progress=False)
    params = dict(model.named_parameters())
    fc1 = params["decoder.layers.0.mlp.linear_fc1.weight"]
    assert 0.015 < fc1.std().item() < 0.025 and abs(fc1.mean().item()) < 0.005
    assert torch.equal(params["decoder.final_layernorm.weight"], torch.ones(64))
    with torch.no_grad():
        logits = model(torch.randint(0, 70000, (1, 12)), torch.arange(12)[None])
    assert logits.shape == (1, 12, 70000) and torch.isfinite(logits).all()


def test_throughput_runs_an_architecture_with_random_weights(hf_config, tmp_path):
    out = tmp_path / "result.json"
    result = throughput.main(["--hf-config", str(hf_config), "--num-prompts", "3", "--input-len", "6",
                              "--output-len", "4", "--repeats", "1", "--dtype", "float32", "--cpu-kernels", "native",
                              "--output-json", str(out)])
    assert result["setup"]["load_format"] == "dummy" and result["dtype"] == "float32"
    assert result["cpu_kernel_tuning"] is None  # pinned: nothing timed
    assert result["output_tokens"] == 12 and result["output_tokens_per_s"] > 0
    # One step prefills the three prompts (and samples their first tokens), three decode.
    assert result["steps"] == 4
    assert 0 < result["engine_ms_per_step"] < result["step_ms"] and 0 < result["engine_share_of_step"] < 1
    assert json.loads(out.read_text())["runs_s"] == result["runs_s"]
    with pytest.raises(SystemExit, match="--compare-hf needs the checkpoint's weights"):
        throughput.main(["--hf-config", str(hf_config), "--compare-hf"])
