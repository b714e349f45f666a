"""The tpserve format: what save_checkpoint writes, what load_model reads back, and bad input.

Every bad input must fail with the file and tensor named, and a failed write must leave
nothing behind: neither the destination nor a temporary folder.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from ckpt_helpers import logits_of
from helpers import converted, random_hf_model

from tpserve.model.checkpoint import CheckpointError, load_model, read_checkpoint_info, save_checkpoint
from tpserve.model.checkpoint.format import FORMAT_VERSION, INDEX_FILE, TokenizerInfo
from tpserve.model.parallel_state import ParallelState

TOKENS = [[5, 9, 2, 77, 300, 41, 8, 3], [1, 200, 150, 12, 12, 12, 6, 0]]


@pytest.fixture(scope="module")
def llama():
    hf = random_hf_model("llama_gqa")
    config, state = converted(hf)
    return hf, config, state


@pytest.fixture
def checkpoint(llama, tmp_path):
    _, config, state = llama
    tok = TokenizerInfo(bos_token_id=1, eos_token_id=2, eos_token_ids=(2, 7), chat_template="{{ x }}")
    # ~40 KB shards: the test model (~190 KB) spreads over several files.
    return save_checkpoint(tmp_path / "ckpt", config, state, tokenizer_dir=None, dtype=torch.float32,
                           max_shard_bytes=40_000, tokenizer=tok)


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_layout_and_info(checkpoint, llama):
    _, config, state = llama
    index = json.loads((checkpoint / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((checkpoint / f).is_file() for f in files)
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    raw = json.loads((checkpoint / "config.json").read_text())
    assert (raw["format"], raw["format_version"], raw["dtype"]) == ("tpserve", FORMAT_VERSION, "float32")

    info = read_checkpoint_info(checkpoint)
    assert info.config.to_dict() == config.to_dict()
    assert (info.bos_token_id, info.eos_token_id, info.eos_token_ids) == (1, 2, (2, 7))
    assert info.chat_template == "{{ x }}" and info.dtype == torch.float32 and not info.has_tokenizer


def test_loaded_model_gives_hf_logits(checkpoint, llama):
    hf, _, _ = llama
    model = load_model(checkpoint, dtype=torch.float32, progress=False)
    torch.testing.assert_close(logits_of(model, TOKENS), hf(torch.tensor(TOKENS)).logits, atol=1e-4, rtol=1e-4)


def test_bfloat16_storage_loads_into_float32(llama, tmp_path):
    hf, config, state = llama
    path = save_checkpoint(tmp_path / "bf16", config, state, tokenizer_dir=None, dtype=torch.bfloat16)
    assert read_checkpoint_info(path).dtype == torch.bfloat16
    model = load_model(path, dtype=torch.float32, progress=False)
    weight = model.decoder.layers[0].mlp.linear_fc2.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, state["decoder.layers.0.mlp.linear_fc2.weight"].bfloat16().float())


def test_padded_vocabulary_rows_are_dropped(llama, tmp_path):
    _, config, state = llama
    padded = dict(state)
    padded["embedding.word_embeddings.weight"] = torch.cat(
        (state["embedding.word_embeddings.weight"], torch.zeros(83, config.transformer.hidden_size))
    )  # 301 -> 384 rows, as Megatron pads
    path = save_checkpoint(tmp_path / "p", config, padded, tokenizer_dir=None, dtype=torch.float32)
    with safetensors.safe_open(str(next(path.glob("model-*.safetensors"))), "pt") as f:
        assert f.get_slice("embedding.word_embeddings.weight").get_shape()[0] == 301


# --- bad input -----------------------------------------------------------------------------


def test_wrong_shape_is_refused_before_writing(llama, tmp_path):
    _, config, state = llama
    bad = dict(state)
    bad["decoder.layers.1.mlp.linear_fc2.weight"] = torch.zeros(64, 95)
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.1\.mlp\.linear_fc2\.weight: stored shape \[64, 95\], the model needs \[64, 96\]"):
        save_checkpoint(tmp_path / "out", config, bad, tokenizer_dir=None, dtype=torch.float32)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_missing_and_unknown_tensors_are_named(llama, tmp_path):
    _, config, state = llama
    bad = {k: v for k, v in state.items() if k != "decoder.final_layernorm.weight"} | {"extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"(?s)missing tensors: \[.decoder\.final_layernorm\.weight.\].*no parameter for: \[.extra\.weight.\]"):
        save_checkpoint(tmp_path / "out", config, bad, tokenizer_dir=None, dtype=torch.float32)


def test_a_failure_mid_write_leaves_nothing(llama, tmp_path, monkeypatch):
    _, config, state = llama
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        safetensors.torch.save_file(tensors, filename, metadata)

    monkeypatch.setattr("tpserve.model.checkpoint.writer.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "out", config, state, tokenizer_dir=None, dtype=torch.float32, max_shard_bytes=40_000)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_existing_destination_is_not_overwritten(checkpoint, llama):
    _, config, state = llama
    with pytest.raises(FileExistsError, match="already exists"):
        save_checkpoint(checkpoint, config, state, tokenizer_dir=None, dtype=torch.float32)


def test_missing_shard_names_the_file_and_a_tensor(checkpoint):
    index = json.loads((checkpoint / INDEX_FILE).read_text())
    victim = "model-00002-of-" + sorted(set(index["weight_map"].values()))[0].split("-of-")[1]
    (checkpoint / victim).unlink()
    tensor = next(k for k, f in index["weight_map"].items() if f == victim)
    with pytest.raises(CheckpointError, match=rf"{victim} is missing: .* puts tensor '{tensor}' there"):
        load_model(checkpoint, progress=False)


def test_truncated_shard_names_the_file_and_tensor(checkpoint):
    shard = sorted(checkpoint.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: file is truncated: tensor '[\w.]+' ends at byte {len(data)}"):
        load_model(checkpoint, progress=False)


def test_tensor_missing_from_its_shard(checkpoint):
    index_path = checkpoint / INDEX_FILE
    index = json.loads(index_path.read_text())
    index["weight_map"]["decoder.final_layernorm.weight"] = "model-00001-of-" + next(iter(index["weight_map"].values())).split("-of-")[1]
    index_path.write_text(json.dumps(index))
    first = sorted(checkpoint.glob("model-*.safetensors"))[0]
    with safetensors.safe_open(str(first), "pt") as f:
        if "decoder.final_layernorm.weight" in f.keys():
            pytest.skip("the tensor happens to live in the first shard")
    with pytest.raises(CheckpointError, match=r"tensor 'decoder\.final_layernorm\.weight' is listed in .* but not in this file"):
        load_model(checkpoint, progress=False)


def test_unknown_format_version(checkpoint):
    path = checkpoint / "config.json"
    raw = json.loads(path.read_text())
    raw["format_version"] = 99
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config\.json: format_version=99 is not supported"):
        read_checkpoint_info(checkpoint)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        read_checkpoint_info(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match=r"config\.json is missing: .* is not a tpserve checkpoint"):
        read_checkpoint_info(tmp_path)


def _unjoined_state(tp: int, pp: int) -> ParallelState:
    """A ParallelState for a layout no process group was made for: the sizes are checked first."""
    fake = ParallelState.__new__(ParallelState)
    for field, value in [("tensor_model_parallel_rank", 0), ("tensor_model_parallel_size", tp),
                         ("tensor_model_parallel_group", None), ("pipeline_model_parallel_rank", 0),
                         ("pipeline_model_parallel_size", pp)]:
        object.__setattr__(fake, field, value)
    return fake


def test_tensor_parallel_size_that_does_not_divide_the_heads(checkpoint):
    # llama_gqa: 8 heads, 4 query groups; TP 3 divides neither. Checked before any process group use.
    with pytest.raises(CheckpointError, match=r"cannot load at tensor_model_parallel_size=3: .*not divisible.*sizes that work for this model: \[1, 2, 4\]"):
        load_model(checkpoint, _unjoined_state(3, 1), progress=False)


def test_pipeline_parallel_size_that_does_not_divide_the_layers(checkpoint):
    with pytest.raises(CheckpointError, match=r"cannot load at pipeline_model_parallel_size=3: num_layers=2 does not split "
                                              r"evenly into 3 pipeline stages.*sizes that split its 2 layers evenly: \[1, 2\]"):
        load_model(checkpoint, _unjoined_state(1, 3), progress=False)


def test_stored_shape_that_does_not_fit_the_config_is_named_at_load(checkpoint):
    path = checkpoint / "config.json"
    raw = json.loads(path.read_text())
    raw["model"]["transformer"]["ffn_hidden_size"] = 128  # the tensors hold 96
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.0\.mlp\.linear_fc1\.weight: stored shape \[192, 64\], the model needs \[256, 64\]"):
        load_model(checkpoint, progress=False)
