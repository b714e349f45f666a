"""GGUF -> tpserve on a tiny file whose weights use F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K.

The reference is transformers' own GGUF loader on the same file: same logits, same tokens from
the tokenizer rebuilt from the metadata. (The real SmolLM2 GGUF is in test_smollm2_checkpoint.py.)
"""

from __future__ import annotations

import gguf
import pytest
import torch
import transformers
from ckpt_helpers import logits_of
from gguf_files import BOS, CHAT_TEMPLATE, EOS, write_gpt2_gguf, write_llama_gguf

from tpserve.model.checkpoint import convert_gguf, load_model, read_checkpoint_info


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return write_llama_gguf(folder / "tiny-llama.gguf")


def test_every_tensor_type_is_used(llama_gguf):
    types = {t.tensor_type.name for t in gguf.GGUFReader(llama_gguf).tensors}
    assert {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"} <= types


def test_logits_and_tokenizer_equal_transformers(llama_gguf, tmp_path):
    path = convert_gguf(llama_gguf, tmp_path / "tp")
    info = read_checkpoint_info(path)
    assert (info.bos_token_id, info.eos_token_id, info.chat_template) == (BOS, EOS, CHAT_TEMPLATE)

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        llama_gguf.parent, gguf_file=llama_gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = [[1, 50, 260, 7, 99, 200, 3, 258], [258, 257, 256, 0, 255, 100, 12, 13]]
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits
    ours_logits = logits_of(load_model(path, dtype=torch.float32, progress=False), tokens)
    # Random k-quant blocks make logits of ~300: compare relative to that scale.
    torch.testing.assert_close(ours_logits, expected, atol=1e-5 * expected.abs().max(), rtol=0)

    reference = transformers.AutoTokenizer.from_pretrained(llama_gguf.parent, gguf_file=llama_gguf.name)
    ours = transformers.AutoTokenizer.from_pretrained(path)
    for text in ["hello the tell", " the  theta\n\tthe", "ünï 😀 <s>x</s>", ""]:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], repr(text)


def test_gpt2_gguf_equals_transformers(tmp_path):
    file = write_gpt2_gguf(tmp_path / "tiny-gpt2.gguf")
    path = convert_gguf(file, tmp_path / "tp")
    config = read_checkpoint_info(path).config
    assert config.position_embedding_type == "learned_absolute" and config.share_embeddings_and_output_weights
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=file.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = [[1, 50, 260, 7, 99, 200, 3, 258], [258, 257, 256, 0, 255, 100, 12, 13]]
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits
    ours = logits_of(load_model(path, dtype=torch.float32, progress=False), tokens)
    torch.testing.assert_close(ours, expected, atol=1e-5 * expected.abs().max(), rtol=0)


def test_unknown_architecture_is_refused(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    writer.add_tensor("x", torch.zeros(4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"m\.gguf: architecture 'mamba' is not supported"):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "tp")
    assert not (tmp_path / "tp").exists()
