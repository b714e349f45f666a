"""Incremental detokenization: token ids in, text out, one complete character at a time.

Decoding each new token on its own goes wrong in two ways. A byte-level BPE token may hold only
part of a UTF-8 character (SmolLM2 writes most emoji and many CJK characters as 2-3 tokens), which
decodes to U+FFFD until the rest arrives. And a sentencepiece decoder drops the leading space of
whatever it decodes first, so "▁world" decodes to "world" on its own but to " world" after "Hello".

So each step decodes a short window: the tokens of the previous delta (context) followed by the new
ones, and emits what the new tokens added (the prefix_offset/read_offset technique of vLLM and TGI;
our window starts at prefix_offset, `_read` is read_offset). The window is trimmed every step, so
the cost per token stays bounded whatever the length of the output.

The deltas add up to `tokenizer.decode(output_ids, skip_special_tokens=...)`, except in two ways
a stream cannot avoid: the first output token is decoded after the prompt, so a sentencepiece
leading space is kept (" world", as vLLM and OpenAI-style APIs return it); and
`clean_up_tokenization_spaces` is not applied, since it rewrites text already sent (" ." -> ".").
A prompt that ends in the middle of a character gives no context: the character cannot be
completed by the output's text, whose first bytes then decode to U+FFFD, as decode gives them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

REPLACEMENT_CHAR = "\ufffd"  # what decode gives for bytes that are not (yet) a whole character

# Prompt tokens decoded before the first output token. One is enough for a sentencepiece leading
# space; vLLM uses 5, and so do we: the cost is one decode of a few more tokens, once.
PROMPT_CONTEXT_TOKENS = 5

# A UTF-8 character has at most 4 bytes, so at most 3 of them can wait for the 4th; every token
# decodes to at least one byte, so a character still unfinished at the end of the text began
# within the last 3 tokens. Tokens before those are final even when the text ends in U+FFFD.
MAX_UNFINISHED_TOKENS = 3


class IncrementalDetokenizer:
    """The text of one sequence's output tokens, produced as they are generated.

    `append` returns the text that new tokens complete; `flush` at the end of generation returns
    what is still held (bytes of an unfinished character, as U+FFFD like `decode`).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
    ) -> None:
        backend = tokenizer.backend_tokenizer
        # The Rust decoder directly: `tokenizer.decode` adds ~8 us of Python per call, and we
        # make two calls per token per sequence.
        self._decode = backend.decode
        self._skip_special_tokens = skip_special_tokens
        # decode(skip_special_tokens=True) drops exactly the added tokens marked special; dropping
        # them on the way in keeps the window for tokens that have text.
        self._hidden_ids = (
            frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
            if skip_special_tokens
            else frozenset()
        )
        # Ids past the tokenizer's vocabulary (a model's embedding padded to a round size) decode
        # to nothing; dropped too, so that every token in the window has text.
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        context: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if len(context) == PROMPT_CONTEXT_TOKENS:
                break
            if self._visible(token_id):
                context.append(token_id)
        context.reverse()
        if self._text_of(context).endswith(REPLACEMENT_CHAR):
            context = []  # the prompt ends mid-character: see the module docstring
        # window = [ context (text already accounted for) | tokens whose text is not yet out ]
        self._window = context
        self._read = len(context)
        self._deltas: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._deltas) > 1:
            self._deltas[:] = ["".join(self._deltas)]  # joined once, then kept joined
        return self._deltas[0] if self._deltas else ""

    def append(self, token_ids: list[int]) -> str:
        """Add generated tokens; return the text they complete ("" while a character is unfinished)."""
        self._window.extend(t for t in token_ids if self._visible(t))
        if len(self._window) == self._read:
            return ""  # nothing visible was added
        return self._emit(hold_unfinished=True)

    def flush(self) -> str:
        """Generation ended: return the held text, with unfinished bytes as U+FFFD like decode."""
        if len(self._window) == self._read:
            return ""
        return self._emit(hold_unfinished=False)

    def _visible(self, token_id: int) -> bool:
        return token_id < self._vocab_size and token_id not in self._hidden_ids

    def _text_of(self, token_ids: list[int]) -> str:
        return self._decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _emit(self, hold_unfinished: bool) -> str:
        """Emit the text of the window's unread tokens, and slide the window past them.

            window  = [ c0 c1 | n0 n1 n2 ]           _read = 2
            prefix  = decode(c0 c1)                  text already out (or the prompt's)
            full    = decode(c0 c1 n0 n1 n2)
            delta   = full[len(prefix):]
            window -> [ n0 n1 n2 | ]                 the new tokens are the next step's context

        While `full` ends in U+FFFD the tokens are held (the last character may be unfinished).
        If more than MAX_UNFINISHED_TOKENS are held, those before the last 3 are final: emit up
        to there (cut) and keep the rest unread, so a stream of invalid bytes cannot grow the window:

            window  = [ c0 | x0 x1 x2 x3 x4 ]        full ends in U+FFFD
                                 cut ^               text of c0..x1 is final
            window -> [ x0 x1 | x2 x3 x4 ]
        """
        window, read = self._window, self._read
        prefix = self._text_of(window[:read])
        full = self._text_of(window)
        cut = len(window)
        if hold_unfinished and full.endswith(REPLACEMENT_CHAR):
            cut = len(window) - MAX_UNFINISHED_TOKENS
            if cut <= read:
                return ""
            done = self._text_of(window[:cut])
            if not full.startswith(done):
                return ""  # a decoder that breaks the byte argument: holding is always safe
            full = done
        delta = full[len(prefix):]
        self._window = window[read:]
        self._read = cut - read
        self._deltas.append(delta)
        return delta
