"""Incremental detokenization: token ids in, text out, one complete character at a time.

Decoding each new token on its own goes wrong in two ways. A byte-level BPE token may hold only
part of a UTF-8 character (SmolLM2 writes most emoji, and Korean syllables, as 2-3 tokens), which
decodes to U+FFFD until the rest arrives. And a sentencepiece decoder drops the leading space of
whatever it decodes first, so "▁world" decodes to "world" on its own but to " world" after "Hello".

So, as vLLM and TGI do, each step decodes a short window of tokens, the last few already shown
(context) followed by the new ones, and emits the text the new ones added. Where they keep two
token offsets (prefix_offset, read_offset) and decode twice per step, we keep the window and the
number of its characters already sent: one decode per step, and an unfinished character holds
back only itself, not the whole token it shares with finished ones. The window is cut back to its
last few tokens when it grows, so the cost per token stays bounded whatever the output's length.

The deltas add up to `tokenizer.decode(output_ids, skip_special_tokens=...)`, except where a stream
cannot match it: the first output token is decoded after the prompt, so a sentencepiece leading
space is kept (" world", as vLLM and OpenAI-style APIs return it); `clean_up_tokenization_spaces`
is not applied, as it would rewrite text already sent (" ." -> "."); nor is a decoder that
rewrites earlier text itself: WordPiece's cleanup, or byte fallback when an invalid byte token
follows valid ones (decode then shows the whole run of byte tokens as U+FFFD, characters already
sent included). A prompt that ends in the middle of a character gives no context: its end cannot
be finished by the output, whose first bytes decode to U+FFFD, as decode gives them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

REPLACEMENT_CHAR = "\ufffd"  # what decode gives for bytes that are not (yet) a whole character

# The trailing run of U+FFFD is held back: the next tokens may still turn it into characters. For a
# byte-level decoder (Rust's from_utf8_lossy) only the last one can change, but sentencepiece's
# byte fallback shows a whole run of byte tokens as U+FFFD until all of it is valid UTF-8. A run
# longer than this is garbage (a model repeating a stray byte), and goes out as it is, so that the
# window stays bounded.
MAX_HELD_CHARS = 32

# Cutting the window back keeps the tokens of the held text (a held U+FFFD comes from at most 3
# bytes, so from at most 3 tokens: every token in the window decodes to at least one byte) and this
# many before them, as context: a sentencepiece leading space is then kept. The window is cut once
# it is twice as long as what a cut keeps, so a cut (one decode more) comes every few tokens. The
# first output token gets as many prompt tokens for context (vLLM uses 5).
KEEP_TOKENS = 4


class IncrementalDetokenizer:
    """The text of one sequence's output tokens, produced as they are generated.

    `append` returns the text that new tokens complete; `flush`, at the end of generation, what is
    still held (bytes of an unfinished character, as U+FFFD like decode).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ) -> None:
        backend = tokenizer.backend_tokenizer
        # The Rust decoder itself: `tokenizer.decode` adds ~8 us of Python per call.
        self._decode = backend.decode
        self._skip_special_tokens = skip_special_tokens
        # decode(skip_special_tokens=True) drops exactly the added tokens marked special. Dropping
        # them on the way in gives the same text, and keeps the window for tokens that have some.
        self._hidden_ids = (
            frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
            if skip_special_tokens
            else frozenset()
        )
        # Ids past the tokenizer's vocabulary (a model's embedding padded to a round size) decode
        # to nothing: dropped too.
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)

        context: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if len(context) == KEEP_TOKENS:
                break
            if self._visible(token_id):
                context.append(token_id)
        context.reverse()
        context_text = self._text_of(context)
        if context_text.endswith(REPLACEMENT_CHAR):
            context, context_text = [], ""  # the prompt may end mid-character: see the docstring
        self._window = context
        self._sent = len(context_text)  # characters of decode(window) already out (or the prompt's)

    def append(self, token_ids: list[int]) -> str:
        """Add generated tokens; return the text they complete ("" while a character is unfinished).

            window         = [ c0 c1 c2 c3 | n0 n1 ]        c: shown before, n: new
            decode(window) = "..shown.."  "ab"  "\ufffd"
                             |<-- sent -->| delta | held

        Everything before the held U+FFFD is final, so it goes out now: of a token that ends one
        character and begins another, the first goes out at once.
        """
        for t in token_ids:  # a loop, not a generator over _visible: this runs for every token
            if t < self._vocab_size and t not in self._hidden_ids:
                self._window.append(t)
        full = self._text_of(self._window)
        held = min(MAX_HELD_CHARS, len(full) - len(full.rstrip(REPLACEMENT_CHAR)))
        end = len(full) - held
        delta = full[self._sent : end]
        # end < sent when a byte-fallback token joins the run of bytes of a character already
        # sent: decode shows the whole run as U+FFFD until it is valid again.
        self._sent = max(self._sent, end)
        keep = KEEP_TOKENS + 3 * held
        if len(self._window) > 2 * keep:
            self._cut_window(full, keep)
        return delta

    def flush(self) -> str:
        """Generation ended: return the held text, unfinished bytes as U+FFFD like decode."""
        full = self._text_of(self._window)
        delta = full[self._sent :]
        self._sent = len(full)
        return delta

    def _visible(self, token_id: int) -> bool:
        return token_id < self._vocab_size and token_id not in self._hidden_ids

    def _text_of(self, token_ids: list[int]) -> str:
        return self._decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _cut_window(self, full: str, keep: int) -> None:
        """Keep only the last `keep` tokens (or up to 3 more) where they decode to the end of the
        text, and count the characters already sent anew.

            window = [ t0 t1 t2 t3 t4 | t5 t6 t7 t8 ]      full = decode(window), keep = 4
            rest   =                decode(t5..t8)          full ends with rest
            sent   = len(rest) - (len(full) - sent)         the unsent text stays unsent

        A cut inside a character decodes its bytes in t5 to U+FFFD, and a cut inside a run of
        byte-fallback tokens would spoil every byte token that joins the run later: then full does
        not end with rest. A character has at most 4 bytes, so one of 4 neighbouring cuts falls
        between characters; inside a long byte-fallback run none may, and the window is kept for a
        step more (slower, never wrong). A sentencepiece leading space that rest loses is in its
        sent part, and harmless there.
        """
        num_unsent = len(full) - self._sent
        for k in range(keep, min(keep + 4, len(self._window))):
            rest_ids = self._window[-k:]
            rest = self._text_of(rest_ids)
            if len(rest) >= num_unsent and full.endswith(rest):
                self._window = rest_ids
                self._sent = len(rest) - num_unsent
                return
