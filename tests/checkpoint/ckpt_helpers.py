"""Helpers for the checkpoint tests: Hugging Face folders with a small tokenizer, logits of a loaded model."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def tiny_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocab_size` ids: <unk>, <s>, </s>, then words w3, w4, ..."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_hf_folder(hf_model, folder: Path, **save_kwargs) -> Path:
    """A Hugging Face folder as users download them: weights, config, tokenizer."""
    hf_model.save_pretrained(folder, **save_kwargs)
    tiny_tokenizer(hf_model.config.vocab_size).save_pretrained(folder)
    return folder


@torch.no_grad()
def logits_of(model, token_ids: list[list[int]]) -> torch.Tensor:
    ids = torch.tensor(token_ids)
    return model(ids, torch.arange(ids.shape[1]).expand_as(ids))
