"""Token ids -> text deltas, with stop strings that are never emitted and never split.

Byte-level BPE tokens can end in the middle of a UTF-8 character, so text is decoded over a
short window of recent ids and only released once it no longer ends in the replacement
character (the prefix/read-offset scheme vLLM and TGI use). Released text then passes a stop
filter that holds back any tail which could still become a stop string, so a stop string is
cut out whole even when its pieces arrive in different steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tokenizers import Tokenizer


@dataclass
class TextDelta:
    text: str  # new text for the client (may be empty)
    stopped: bool  # a stop string was found: the request is finished


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.pending = ""  # decoded text not yet released (a possible stop-string prefix)

    def _decode_new(self) -> str:
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix):]
        return ""

    def push(self, token_id: int, check_stops: bool = True) -> TextDelta:
        """Add a token; ``check_stops=False`` releases its text unscanned (before ``min_tokens``)."""
        self.ids.append(token_id)
        self.pending += self._decode_new()
        if not check_stops:
            out, self.pending = self.pending, ""
            return TextDelta(out, False)
        return self._release(final=False)

    def finish(self) -> str:
        """Text held back at the end (a partial stop-string prefix that never completed)."""
        return self._release(final=True).text

    def _release(self, final: bool) -> TextDelta:
        if self.stop:
            hit = min(((self.pending.find(s), s) for s in self.stop if s in self.pending), default=None)
            if hit is not None:
                out = self.pending[: hit[0]]
                self.pending = ""
                return TextDelta(out, True)
        keep = 0 if final else self._held_back()
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return TextDelta(out, False)

    def _held_back(self) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best


def _byte_level_alphabet() -> dict[str, int]:
    """The ByteLevel pre-tokenizer's character for each byte, inverted (character -> byte).

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 bytes (controls,
    space, DEL, NBSP, soft hyphen) take the code points 256, 257, ... in byte order, so that every
    vocabulary entry is a string of printable characters.
    """
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


class TokenBytes:
    """A token id -> the exact bytes it stands for (OpenAI's logprobs ``bytes``).

    A byte-level BPE token can hold part of a UTF-8 character, whose decoded text is only a
    replacement character; its bytes are what lets a client put the character back together.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        self.byte_level = decoder.get("type") == "ByteLevel"
        self.alphabet = _byte_level_alphabet() if self.byte_level else {}
        self.cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        b = self.cache.get(token_id)
        if b is None:
            piece = self.tok.id_to_token(token_id) or ""
            if self.byte_level and all(c in self.alphabet for c in piece):
                b = bytes(self.alphabet[c] for c in piece)
            else:  # a character-level vocabulary, or a special token such as <|endoftext|>
                b = self.tok.decode([token_id], skip_special_tokens=False).encode("utf-8")
            self.cache[token_id] = b
        return b
