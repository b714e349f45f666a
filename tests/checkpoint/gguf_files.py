"""Tiny GGUF files written with the `gguf` package, one tensor type per weight.

Each weight of the tiny model is stored in a different GGML type, so one file exercises every
dequantizer the converter relies on. Types the `gguf` package can quantize (F16, BF16, Q8_0,
Q4_0, Q4_1) are quantized from random floats; the k-quants (Q4_K, Q6_K), which it can only
dequantize, are random blocks with sane f16 scales, which are as valid as any others.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

# Bytes per block of 256 values, and where each block's f16 scale(s) sit.
_K_QUANTS = {T.Q4_K: (144, [0, 2]), T.Q6_K: (210, [208])}

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies hold)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


MERGES = ["h e", "l l", "Ġ t", "Ġt he"]
TOKENS = _bytes_to_unicode() + ["he", "ll", "Ġt", "Ġthe", "<s>", "</s>"]
BOS, EOS = len(TOKENS) - 2, len(TOKENS) - 1


def _tensor(rng: np.random.Generator, shape: tuple[int, int], kind: T, scale: float = 0.2):
    """(data, raw_dtype) of a random weight [out, in] stored as `kind`."""
    if kind in _K_QUANTS:
        block_bytes, scale_offsets = _K_QUANTS[kind]
        blocks = rng.integers(0, 256, size=(shape[0], shape[1] // 256, block_bytes), dtype=np.uint8)
        for offset in scale_offsets:
            blocks[..., offset : offset + 2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
        return blocks.reshape(shape[0], -1), kind
    values = (scale * rng.standard_normal(shape)).astype(np.float32)
    if kind == T.F32:
        return values, None
    return gguf.quants.quantize(values, kind), kind


def _tokenizer(writer: gguf.GGUFWriter) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(MERGES)
    writer.add_token_types([1] * (len(TOKENS) - 2) + [3, 3])  # 3: control (special) tokens
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def write_llama_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer llama (hidden 256, 4 heads / 2 KV heads, FFN 512, untied) using 8 tensor types."""
    rng = np.random.default_rng(seed)
    hidden, ffn, heads, kv_heads, layers = 256, 512, 4, 2, 2
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    _tokenizer(writer)

    vocab = len(TOKENS)
    weights = {"token_embd.weight": ((vocab, hidden), T.Q8_0), "output.weight": ((vocab, hidden), T.Q6_K)}
    kinds = [
        {"attn_q": T.Q4_K, "attn_k": T.Q6_K, "attn_v": T.Q4_1, "attn_output": T.BF16,
         "ffn_gate": T.F16, "ffn_up": T.Q4_0, "ffn_down": T.Q6_K},
        {"attn_q": T.Q8_0, "attn_k": T.F16, "attn_v": T.Q4_K, "attn_output": T.Q4_0,
         "ffn_gate": T.Q4_K, "ffn_up": T.BF16, "ffn_down": T.Q4_1},
    ]
    shapes = {"attn_q": (hidden, hidden), "attn_k": (kv_heads * head_dim, hidden), "attn_v": (kv_heads * head_dim, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    for i in range(layers):
        weights |= {f"blk.{i}.{name}.weight": (shapes[name], kind) for name, kind in kinds[i].items()}
    for name, (shape, kind) in weights.items():
        data, raw = _tensor(rng, shape, kind)
        writer.add_tensor(name, data, raw_dtype=raw)
    for name in ["output_norm.weight"] + [f"blk.{i}.{n}.weight" for i in range(layers) for n in ("attn_norm", "ffn_norm")]:
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_gpt2_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (hidden 64, 4 heads, FFN 256) as llama.cpp writes one: linear weights
    [out, in], biases, and the tied output layer stored as a copy of the embedding."""
    rng = np.random.default_rng(seed)
    # 1024 positions: transformers reads gpt2.context_length into n_ctx, not n_positions, so it
    # only loads position tables of GPT-2's default 1024 rows.
    hidden, ffn, layers, context = 64, 256, 2, 1024
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(layers)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(4)
    writer.add_layer_norm_eps(1e-5)
    _tokenizer(writer)

    embedding, raw = _tensor(rng, (len(TOKENS), hidden), T.Q8_0)
    writer.add_tensor("token_embd.weight", embedding, raw_dtype=raw)
    writer.add_tensor("output.weight", embedding, raw_dtype=raw)
    positions, raw = _tensor(rng, (context, hidden), T.F16)
    writer.add_tensor("position_embd.weight", positions, raw_dtype=raw)
    kinds = {"attn_qkv": ((3 * hidden, hidden), T.Q8_0), "attn_output": ((hidden, hidden), T.BF16),
             "ffn_up": ((ffn, hidden), T.F16), "ffn_down": ((hidden, ffn), T.Q4_1)}

    def vector(n: int, offset: float = 0.0):
        return (offset + 0.1 * rng.standard_normal(n)).astype(np.float32)

    for i in range(layers):
        for name, (shape, kind) in kinds.items():
            data, raw = _tensor(rng, shape, kind)
            writer.add_tensor(f"blk.{i}.{name}.weight", data, raw_dtype=raw)
            writer.add_tensor(f"blk.{i}.{name}.bias", vector(shape[0]))
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", vector(hidden, 1.0))
            writer.add_tensor(f"blk.{i}.{norm}.bias", vector(hidden))
    writer.add_tensor("output_norm.weight", vector(hidden, 1.0))
    writer.add_tensor("output_norm.bias", vector(hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
