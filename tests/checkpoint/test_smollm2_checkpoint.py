"""The default model through the whole path: GGUF -> tpserve checkpoint -> load_model.

Its tokenizer is rebuilt from the GGUF metadata; it must encode exactly as transformers' GGUF
tokenizer does. Its weights must greedy-decode to transformers' tokens on the same GGUF
(tests/fixtures/smollm2_greedy.json) and give the same logits at TP 1 and 3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from helpers import greedy_decode

from tpserve.model.checkpoint import load_model, prepare_default_model, read_checkpoint_info
from tpserve.model.checkpoint.gguf import default_gguf_path
from tpserve.model.launcher import RankContext
from tpserve.model.parallel_state import ParallelState

pytestmark = pytest.mark.slow

GOLDEN = json.loads((Path(__file__).parent.parent / "fixtures" / "smollm2_greedy.json").read_text())
# Eight prompts (plain and chat) in one packed batch; tests/model/test_smollm2_greedy.py runs them all.
CASES = [c for c in GOLDEN["cases"] if not c["chat"]][:4] + [c for c in GOLDEN["cases"] if c["chat"]][:4]
PROMPTS = [case["input_ids"] for case in CASES]

# Unicode of many scripts, emoji (multi-byte, ZWJ), whitespace runs, code, special tokens as
# text, and strings that stress the pre-tokenizer (digits, contractions, apostrophes).
CORPUS = [
    "Hello, world!",
    "  leading spaces and trailing   ",
    "tabs\tand\t\tnewlines\n\n\nand\r\nCRLF",
    "          ten spaces, then \u3000ideographic space",
    "Ünïcödé: naïve café, Straße, İstanbul, ǅ",
    "日本語のテキストと中文文本，한국어 텍스트",
    "Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย",
    "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 and \u200bzero\u200dwidth",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] >> 2; }",
    "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|> text <|im_end|><|im_start|>",
    "1234567890 3.14159 1e-10 0xDEADBEEF 1,000,000",
    "I'm you're they'll we've she'd it's CAN'T",
    "https://example.com/path?q=1&r=2#frag user@example.org",
    "\n",
    " ",
    "",
]


@pytest.fixture(scope="module")
def gguf_tokenizer():
    path = default_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_prepared_once_with_config_and_tokenizer_facts(smollm2_checkpoint):
    assert prepare_default_model(smollm2_checkpoint.parent) == smollm2_checkpoint  # already there: no work
    info = read_checkpoint_info(smollm2_checkpoint)
    t = info.config.transformer
    assert (t.num_layers, t.hidden_size, t.num_attention_heads, t.num_query_groups) == (30, 576, 9, 3)
    assert info.config.vocab_size == 49152 and info.config.share_embeddings_and_output_weights
    assert (info.bos_token_id, info.eos_token_id, info.eos_token_ids) == (1, 2, (2,))
    assert "<|im_start|>" in info.chat_template and info.dtype == torch.float32


def test_tokenizer_encodes_as_transformers_gguf_tokenizer(smollm2_checkpoint, gguf_tokenizer):
    ours = transformers.AutoTokenizer.from_pretrained(smollm2_checkpoint)
    for text in CORPUS:
        for special in (True, False):
            expected = gguf_tokenizer(text, add_special_tokens=special)["input_ids"]
            assert ours(text, add_special_tokens=special)["input_ids"] == expected, repr(text)
        assert ours.decode(gguf_tokenizer(text)["input_ids"]) == gguf_tokenizer.decode(gguf_tokenizer(text)["input_ids"])
    assert (ours.bos_token_id, ours.eos_token_id) == (gguf_tokenizer.bos_token_id, gguf_tokenizer.eos_token_id)
    messages = [{"role": "user", "content": "Hi there"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _greedy(ctx: RankContext, path, prompts, steps, batch: int = 8):
    """Greedy tokens and first logits of every prompt, `batch` prompts per packed batch (the
    stepper's InferenceParams holds at most 16 sequences)."""
    model = load_model(path, ctx.parallel_state, dtype=torch.float32, progress=False)
    tokens, logits = [], []
    for i in range(0, len(prompts), batch):
        t, first = greedy_decode(model, prompts[i : i + batch], steps)
        tokens += t
        logits.append(first)
    return tokens, torch.cat(logits)


@pytest.fixture(scope="module")
def tp1(smollm2_checkpoint):
    return _greedy(RankContext(ParallelState()), smollm2_checkpoint, PROMPTS, GOLDEN["max_new_tokens"])


def test_greedy_tokens_equal_transformers(tp1):
    tokens, _ = tp1
    assert len(tokens) == len(CASES) == 8
    for case, got in zip(CASES, tokens):
        assert got == case["output_ids"], f"prompt {case['prompt']!r}"


def test_tensor_parallel_3_loads_the_same_checkpoint(tp1, smollm2_checkpoint, worker_groups):
    """9 heads and 3 query groups over 3 ranks; a few prompts and steps (tests/model covers all)."""
    tokens, logits = tp1
    few = [0, 2, 6]  # two plain prompts (one code) and a chat one
    runs = worker_groups.get(3).run(_greedy, smollm2_checkpoint, [PROMPTS[i] for i in few], 8)
    for tp_tokens, tp_logits in runs:
        torch.testing.assert_close(tp_logits, logits[few], atol=1e-5 * logits.abs().max(), rtol=0)
        assert tp_tokens == [tokens[i][:8] for i in few]
