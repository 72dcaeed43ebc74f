"""The tokenizer's byte table (serve/tokens.py): each token's exact bytes, even part of a character."""

from __future__ import annotations

import pytest

from nextoken.serve.tokens import TokenBytes
from nextoken.train.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe", ["hello world, the end. 日本語 ✓ emoji 😀"] * 5, vocab_size=280)


def test_token_bytes_rebuild_the_text_even_inside_a_character(bpe) -> None:
    """Concatenated token bytes are the UTF-8 of the text, including tokens that hold part of a character."""
    tb = TokenBytes(bpe)
    text = "hello 日本語 ✓ emoji 😀, the end."
    ids = bpe.encode(text).ids
    pieces = [tb(i) for i in ids]
    assert b"".join(pieces).decode("utf-8") == bpe.decode(ids)
    partial = [p for p in pieces if _not_utf8(p)]
    assert partial  # the test really covers tokens that split a character
    for i in range(bpe.get_vocab_size()):  # every byte of the alphabet maps back
        assert isinstance(tb(i), bytes)


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_token_bytes_of_a_character_vocabulary() -> None:
    tok = train_tokenizer("char", ["abc é"], vocab_size=50)
    tb = TokenBytes(tok)
    assert b"".join(tb(i) for i in tok.encode("é a").ids) == "é a".encode()
