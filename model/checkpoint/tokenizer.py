"""Tokenizer files in a checkpoint: the facts the engine needs, and copying them across.

The engine loads the tokenizer with `transformers.AutoTokenizer.from_pretrained(checkpoint)`;
what it needs before that (which ids end generation, the chat template) is read here from the
plain JSON files, without importing transformers, and kept in config.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tpserve.model.checkpoint.format import TOKENIZER_FILES, TokenizerInfo


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value) -> str | None:
    """tokenizer_config writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _token_ids(tokenizer_json: dict) -> dict[str, int]:
    """token text -> id: the model's vocabulary (a dict for BPE/WordPiece, a list for Unigram)
    overlaid with the added (special) tokens."""
    vocab = (tokenizer_json.get("model") or {}).get("vocab") or {}
    if isinstance(vocab, list):
        vocab = {entry[0]: i for i, entry in enumerate(vocab)}
    ids = dict(vocab)
    for token in tokenizer_json.get("added_tokens") or []:
        ids[token["content"]] = token["id"]
    return ids


def chat_template_of(folder: Path) -> str | None:
    """The default chat template: tokenizer_config.json's, or transformers 5's chat_template.jinja."""
    template = _json(folder / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if template is None:
        template = _json(folder / "chat_template.json").get("chat_template")
    return template


def tokenizer_info(folder: str | Path) -> TokenizerInfo:
    """bos/eos ids and chat template of a Hugging Face tokenizer folder (plus its config.json)."""
    folder = Path(folder)
    tok_config = _json(folder / "tokenizer_config.json")
    ids = _token_ids(_json(folder / "tokenizer.json"))
    model_config = _json(folder / "config.json")
    generation = _json(folder / "generation_config.json")

    def special(name: str) -> int | None:
        text = _token_text(tok_config.get(f"{name}_token"))
        if text is not None and text in ids:
            return ids[text]
        value = model_config.get(f"{name}_token_id")
        return value if isinstance(value, int) else None

    bos, eos = special("bos"), special("eos")
    stops = [eos] if eos is not None else []
    extra = generation.get("eos_token_id")
    for value in extra if isinstance(extra, list) else [extra]:
        if isinstance(value, int) and value not in stops:
            stops.append(value)
    return TokenizerInfo(bos_token_id=bos, eos_token_id=eos, eos_token_ids=tuple(stops),
                         chat_template=chat_template_of(folder))


def copy_tokenizer(src: Path, dst: Path, chat_template: str | None) -> None:
    """Copy the tokenizer files of `src` into `dst`, with the chat template in tokenizer_config.json
    (where every transformers version looks for it) as well as in chat_template.jinja if src had one."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    config_path = dst / "tokenizer_config.json"
    if chat_template is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.get("chat_template") != chat_template:
            config["chat_template"] = chat_template
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
