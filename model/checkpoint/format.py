"""The tpserve checkpoint format: what a checkpoint folder holds, and reading its description.

    DIR/
      config.json                        format + version, stored dtype, GPTModelConfig, tokenizer facts
      model.safetensors.index.json       {"metadata": {"total_size": N}, "weight_map": {tensor: file}}
      model-00001-of-0000K.safetensors   full tensors under Megatron-Core names, at most ~1 GiB each
      tokenizer.json, tokenizer_config.json (with chat_template), ...   when the source had a tokenizer

Tensors are stored whole, in Megatron-Core's full-tensor layout (see `hf.py`), with the real
vocabulary only (no padding rows), so one checkpoint loads at any tensor-parallel size.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tpserve.model.builder import GPTModelConfig

FORMAT_NAME = "tpserve"
# Bumped when a reader of the old version would misread the new one.
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# Copied from a source tokenizer folder when present; tokenizer.json + tokenizer_config.json are
# what `transformers.AutoTokenizer.from_pretrained(DIR)` needs, the rest are kept for old loaders.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)

# Storage dtypes a checkpoint may use, by the name config.json gives them.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, known in DTYPES.items():
        if dtype == known:
            return name
    raise ValueError(f"dtype {dtype} cannot be stored; use one of {sorted(DTYPES)}")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        dtype_name(name)  # validates
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class TokenizerInfo:
    """What the engine needs from the tokenizer without loading it."""

    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Every id that ends generation (eos plus generation_config's extra stop ids, e.g. Llama 3's).
    eos_token_ids: tuple[int, ...] = ()
    chat_template: str | None = None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, fields: dict) -> "TokenizerInfo":
        fields = dict(fields)
        fields["eos_token_ids"] = tuple(fields.get("eos_token_ids") or ())
        return cls(**fields)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: GPTModelConfig  # tensor_model_parallel_size 1; loaders set their own
    dtype: torch.dtype  # how the tensors are stored
    tokenizer: TokenizerInfo
    has_tokenizer: bool  # tokenizer files sit in the folder (AutoTokenizer.from_pretrained(path))

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.tokenizer.eos_token_ids

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read: the message names the file and the fix."""


def config_json(config: GPTModelConfig, dtype: torch.dtype, tokenizer: TokenizerInfo) -> dict:
    """The content of config.json; the stored config is TP-agnostic (TP 1) and in the stored dtype."""
    stored = config.with_tensor_parallel_size(1)
    stored = dataclasses.replace(stored, transformer=dataclasses.replace(stored.transformer, params_dtype=dtype))
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dtype": dtype_name(dtype),
        "model": stored.to_dict(),
        "tokenizer": tokenizer.to_dict(),
    }


def read_checkpoint_info(path: str | Path, require_weights: bool = True) -> CheckpointInfo:
    """Read and check DIR/config.json. Errors say which file or field is wrong and what to do.
    require_weights=False accepts a folder with no weights (for random-weight loading)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder; convert a model first (`tpserve convert --help`)")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path} is missing: {path} is not a tpserve checkpoint "
            f"(a Hugging Face folder? convert it with `tpserve convert --from hf {path} DST`)"
        )
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path} is not valid JSON: {e}") from None
    if raw.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{config_path}: format={raw.get('format')!r}, expected {FORMAT_NAME!r}; this folder is not a tpserve "
            f"checkpoint (convert it with `tpserve convert`)"
        )
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: format_version={version!r} is not supported by this tpserve (it reads version "
            f"{FORMAT_VERSION}); upgrade tpserve or convert the model again"
        )
    for field in ("dtype", "model"):
        if field not in raw:
            raise CheckpointError(f"{config_path}: field {field!r} is missing")
    try:
        dtype = parse_dtype(raw["dtype"])
        config = GPTModelConfig.from_dict(raw["model"])
        tokenizer = TokenizerInfo.from_dict(raw.get("tokenizer") or {})
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    if require_weights and not (path / INDEX_FILE).is_file():
        raise CheckpointError(f"{path / INDEX_FILE} is missing; the checkpoint is incomplete, convert it again")
    return CheckpointInfo(
        path=path,
        config=config,
        dtype=dtype,
        tokenizer=tokenizer,
        has_tokenizer=(path / "tokenizer.json").is_file(),
    )


def valid_tp_sizes(config: GPTModelConfig, limit: int = 64) -> list[int]:
    t = config.transformer
    return [
        tp for tp in range(1, limit + 1)
        if t.num_attention_heads % tp == 0 and t.num_query_groups % tp == 0 and t.ffn_hidden_size % tp == 0
    ]


def valid_pp_sizes(config: GPTModelConfig) -> list[int]:
    layers = config.transformer.num_layers
    return [pp for pp in range(1, layers + 1) if layers % pp == 0]


def at_parallel_sizes(config: GPTModelConfig, tp: int, pp: int = 1, where: Path | str = "checkpoint") -> GPTModelConfig:
    """`config` split over `tp` tensor-parallel ranks and `pp` pipeline stages; sizes that do not
    divide the heads, query groups or layers fail naming the numbers and the sizes that would."""
    try:
        config = config.with_tensor_parallel_size(tp)
    except ValueError as e:
        raise CheckpointError(
            f"{where}: cannot load at tensor_model_parallel_size={tp}: {e} "
            f"(sizes that work for this model: {valid_tp_sizes(config)})"
        ) from None
    try:
        return config.with_pipeline_parallel_size(pp)
    except ValueError as e:
        raise CheckpointError(
            f"{where}: cannot load at pipeline_model_parallel_size={pp}: {e} "
            f"(sizes that split its {config.transformer.num_layers} layers evenly: {valid_pp_sizes(config)})"
        ) from None
