"""Hugging Face folder -> tpserve -> Hugging Face folder: identical tensors, HF's logits.

Every family `hf.py` maps (GPT-2 tied and untied, Llama GQA/MHA/linear RoPE, StableLM partial
rotary, Qwen2 qkv bias, Mistral sliding window) goes through both converters; the exported
folder is loaded by transformers itself.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from ckpt_helpers import CHAT_TEMPLATE, logits_of, save_hf_folder
from helpers import HF_CASES, MOE_CASES, random_hf_model
from safetensors.torch import load_file

from tpserve.model.checkpoint import CheckpointError, load_model, read_checkpoint_info
from tpserve.model.checkpoint.convert_hf import convert_hf
from tpserve.model.checkpoint.export_hf import export_hf

TOKENS = [[5, 9, 2, 77, 300, 41, 8, 3, 11, 12], [1, 200, 150, 12, 12, 12, 6, 0, 99, 98]]


def _hf_tensors(folder):
    files = sorted(folder.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_round_trip_is_identical_and_logits_equal_hf(case, tmp_path):
    hf = random_hf_model(case)
    save_hf_folder(hf, tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "tp")
    export_hf(tmp_path / "tp", tmp_path / "back")

    original, back = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name

    expected = hf(torch.tensor(TOKENS)).logits
    ours = logits_of(load_model(tmp_path / "tp", dtype=torch.float32, progress=False), TOKENS)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(torch.tensor(TOKENS)).logits, expected, atol=0, rtol=0)


def test_sharded_hf_folder_and_bfloat16(tmp_path):
    hf = random_hf_model("llama_gqa")
    save_hf_folder(hf, tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    convert_hf(tmp_path / "hf", tmp_path / "tp", dtype=torch.bfloat16)
    info = read_checkpoint_info(tmp_path / "tp")
    assert info.dtype == torch.bfloat16
    export_hf(tmp_path / "tp", tmp_path / "back", dtype=torch.float32)
    back = _hf_tensors(tmp_path / "back")
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back[name], tensor.bfloat16().float()), name


def test_tokenizer_files_and_facts_travel(tmp_path):
    hf = random_hf_model("llama_mha_tied")
    save_hf_folder(hf, tmp_path / "hf")
    convert_hf(tmp_path / "hf", tmp_path / "tp")
    info = read_checkpoint_info(tmp_path / "tp")
    assert (info.bos_token_id, info.eos_token_id, info.chat_template) == (1, 2, CHAT_TEMPLATE)
    assert json.loads((tmp_path / "tp" / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    original = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path / "tp")
    text = "w5 w9 w17 unknown w300"
    assert ours(text)["input_ids"] == original(text)["input_ids"]
    messages = [{"role": "user", "content": "w5 w6"}]
    assert ours.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(messages, tokenize=False)
    export_hf(tmp_path / "tp", tmp_path / "back")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back(text)["input_ids"] == original(text)["input_ids"]


def test_pickle_weights_need_allow_pickle(tmp_path):
    hf = random_hf_model("gpt2")
    hf.config.save_pretrained(tmp_path / "hf")
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is a pickle file; .*--allow-pickle"):
        convert_hf(tmp_path / "hf", tmp_path / "tp")
    assert not (tmp_path / "tp").exists()
    convert_hf(tmp_path / "hf", tmp_path / "tp", allow_pickle=True)
    assert read_checkpoint_info(tmp_path / "tp").config.transformer.num_layers == 2


def test_unknown_architecture_is_named(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match=r"config\.json: Hugging Face model_type='bert' is not supported"):
        convert_hf(tmp_path / "hf", tmp_path / "tp")


def test_missing_hf_shard_is_named(tmp_path):
    hf = random_hf_model("llama_gqa")
    save_hf_folder(hf, tmp_path / "hf", max_shard_size="50KB")
    victim = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"{victim.name} is missing: .* puts tensor '[\w.]+' there"):
        convert_hf(tmp_path / "hf", tmp_path / "tp")
    assert not (tmp_path / "tp").exists()


@pytest.mark.parametrize("case", sorted(MOE_CASES))
def test_moe_round_trip_from_the_per_expert_layout(case, tmp_path):
    """transformers 5 saves experts one by one (block_sparse_moe.experts.E.w1/w2/w3,
    mlp.experts.E.gate_proj/up_proj/down_proj), as published checkpoints are: those folders
    convert, give transformers' logits, and export back to the same tensors, which transformers
    loads to the same logits."""
    test_round_trip_is_identical_and_logits_equal_hf(case, tmp_path)


def test_export_refuses_q_and_k_norms_it_would_drop(tmp_path):
    """A Megatron model with qk_layernorm (Megatron's per-head norms) serves, but the Hugging Face
    families export writes (Llama, Qwen2) have no such norms: refused, not silently dropped."""
    import dataclasses

    from tpserve.model.checkpoint import save_checkpoint
    from tpserve.model.checkpoint.hf import gpt_config_from_hf, megatron_state_dict_from_hf

    hf = random_hf_model("llama_gqa")
    config = gpt_config_from_hf(hf.config)
    state = megatron_state_dict_from_hf(hf.state_dict(), config)
    config = dataclasses.replace(config, transformer=dataclasses.replace(config.transformer, qk_layernorm="per_head"))
    d = config.transformer.kv_channels
    for i in range(config.transformer.num_layers):
        state[f"decoder.layers.{i}.self_attention.q_layernorm.weight"] = torch.ones(d)
        state[f"decoder.layers.{i}.self_attention.k_layernorm.weight"] = torch.ones(d)
    path = save_checkpoint(tmp_path / "tp", config, state, tokenizer_dir=None, dtype=torch.float32)
    with pytest.raises(ValueError, match="qk_layernorm='per_head' is not supported yet"):
        export_hf(path, tmp_path / "back")
