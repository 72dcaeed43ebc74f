"""A model's tokenizer as the server uses it: how prompts become tokens, which tokens end generation,
and each token's exact bytes.

Shared by both sides of ``serve/``: the HTTP side tokenizes prompts and reports bytes in logprobs
(OpenAI's ``bytes``); the engine re-tokenizes a prompt when another version runs it, and its grammar
hands every token's bytes to llguidance. It knows nothing about requests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from nextoken.export.artifact import eos_ids, prompt_prefix_id
from nextoken.fileio import read_json_object


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
    replacement character; so can a byte-fallback token (``<0xE2>``, SentencePiece-style vocabularies:
    Llama-2, Mistral). Their bytes are what lets a client put the character back together. A
    Metaspace vocabulary writes a word's leading space as ``▁``, which decoding one token alone drops.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        decoder = json.dumps(json.loads(tokenizer.to_str()).get("decoder") or {})
        self.byte_level = '"ByteLevel"' in decoder
        self.metaspace = '"Metaspace"' in decoder or "\\u2581" in decoder or "\u2581" in decoder
        self.alphabet = _byte_level_alphabet() if self.byte_level else {}
        self.special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self.cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        b = self.cache.get(token_id)
        if b is None:
            piece = self.tok.id_to_token(token_id) or ""
            if self.byte_level and all(c in self.alphabet for c in piece):
                b = bytes(self.alphabet[c] for c in piece)
            elif (m := _BYTE_FALLBACK.fullmatch(piece)) is not None:
                b = bytes([int(m.group(1), 16)])
            elif self.metaspace and token_id not in self.special:
                b = piece.replace("\u2581", " ").encode("utf-8")
            else:  # a character-level vocabulary, or a special token such as <|endoftext|>
                b = self.tok.decode([token_id], skip_special_tokens=False).encode("utf-8")
            self.cache[token_id] = b
        return b


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class ModelTokenizer:
    """A model version's tokenizer as the server feeds and reads it (both processes use it).

    ``encode_prompt`` is the one rule for a text prompt's tokens: the tokenizer's own special tokens
    (its post-processor: Llama's BOS, none for Qwen2 or GPT-2), after nextoken's ``<|endoftext|>`` for
    a model nextoken trained (``export.artifact.prompt_prefix_id``). ``eos_ids`` end generation.
    """

    tokenizer: Tokenizer
    eos_ids: tuple[int, ...]  # the first is the model's own end-of-text
    prefix_id: int | None
    tokenizer_config: dict[str, Any]

    @classmethod
    def from_folder(cls, folder: str | Path, config: dict[str, Any], generation_config: dict[str, Any]
                    ) -> ModelTokenizer:
        folder = Path(folder)
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tc = read_json_object(folder / "tokenizer_config.json") or {}
        prefix = prompt_prefix_id(config)
        if tok.encode("", add_special_tokens=True).ids:  # the tokenizer adds its own (a BOS): never two
            prefix = None
        return cls(tok, tuple(eos_ids(config, generation_config)), prefix, tc)

    @property
    def eos_id(self) -> int:
        return self.eos_ids[0]

    def encode(self, text: str) -> list[int]:
        """The text's own tokens, no special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """What the model is fed for a text prompt (the text alone with ``add_special_tokens=False``)."""
        if not add_special_tokens:
            return self.encode(text)
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        return [self.prefix_id, *ids] if self.prefix_id is not None else ids

    def special_token_text(self, name: str) -> str | None:
        """``bos_token`` / ``eos_token`` ... as tokenizer_config.json names it (a string or an AddedToken dict)."""
        v = self.tokenizer_config.get(name)
        return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None
