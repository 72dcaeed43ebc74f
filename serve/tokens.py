"""The tokenizer's byte table: each token id -> the exact bytes it stands for.

Shared by both sides of ``serve/``: the engine's grammar hands every token's bytes to llguidance, and
the HTTP side reports them in logprobs (OpenAI's ``bytes``). It knows nothing about requests.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer


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
