"""Incremental detokenisation for streaming: text deltas that never split a multi-byte character.

Decoding a token alone is wrong (byte-level BPE tokens can hold part of a UTF-8 character; SentencePiece-style
decoders drop a leading space at the start of a decode), and re-decoding everything generated so far costs
O(total) per step. Like vLLM's incremental detokenizer, we decode only a window: the tokens since the last
point where the text was complete, plus the previous complete stretch as left context, and emit the part of
its text that the context alone does not produce.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"  # what a decoder produces for bytes that do not (yet) form a character


class Decoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class StreamingDetokenizer:
    """Turns generated token ids, pushed as they arrive, into text deltas whose concatenation equals
    ``tokenizer.decode(all_ids, skip_special_tokens=...)``. Text ending in an incomplete character is held back
    until a later token completes it; :meth:`finish` flushes whatever is left."""

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids: list[int] = []
        # Invariant: token_ids[:read_offset] decode to complete text that has all been emitted;
        # token_ids[prefix_offset:read_offset] is the left context of the next decode window.
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""
        # Characters of the window past the context already emitted while its tail was still incomplete.
        self._emitted_in_window = 0

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _window_text(self) -> str:
        """Text of the tokens since ``read_offset``, given the context before it."""
        return self._decode(self._token_ids[self._prefix_offset:])[len(self._prefix_text):]

    def push(self, token_ids: Sequence[int]) -> str:
        """Adds newly generated tokens; returns the text they complete (possibly empty)."""
        self._token_ids.extend(int(token_id) for token_id in token_ids)
        new_text = self._window_text()
        complete_text = new_text.rstrip(_REPLACEMENT)
        delta = complete_text[self._emitted_in_window:]
        if len(complete_text) < len(new_text):  # an incomplete character at the end: wait for its other bytes
            self._emitted_in_window = max(self._emitted_in_window, len(complete_text))
            return delta
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        self._prefix_text = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        self._emitted_in_window = 0
        return delta

    def finish(self) -> str:
        """Flushes the held-back text (a generation that stopped inside a character ends in U+FFFD, as
        ``tokenizer.decode`` of all tokens does)."""
        delta = self._window_text()[self._emitted_in_window:]
        self._prefix_offset = self._read_offset = len(self._token_ids)
        self._prefix_text = ""
        self._emitted_in_window = 0
        return delta
