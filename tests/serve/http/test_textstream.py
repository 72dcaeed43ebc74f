"""Detokenization: multi-byte characters across tokens, stop strings never split nor emitted."""

from __future__ import annotations

import pytest

from nextoken.serve.http.textstream import TextStream
from nextoken.train.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer("bpe", ["hello world, the end. 日本語 ✓ emoji 😀"] * 5, vocab_size=280)


def run(tok, text: str, stop: list[str]) -> tuple[list[str], bool]:
    s = TextStream(tok, stop)
    pieces = []
    for t in tok.encode(text).ids:
        d = s.push(t)
        pieces.append(d.text)
        if d.stopped:
            return pieces, True
    pieces.append(s.finish())
    return pieces, False


def test_multibyte_characters_are_never_split(bpe) -> None:
    pieces, _ = run(bpe, "日本語 😀 ok", [])
    assert "".join(pieces) == "日本語 😀 ok"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_is_cut_whole_even_across_tokens(bpe) -> None:
    pieces, stopped = run(bpe, "hello world, the end. more", ["the end"])
    assert stopped and "".join(pieces) == "hello world, "
    assert not any("the" in p for p in pieces)


def test_a_held_back_prefix_is_released_when_it_does_not_complete(bpe) -> None:
    pieces, stopped = run(bpe, "hello the", ["the end"])
    assert not stopped and "".join(pieces) == "hello the"


def test_include_stop_str_in_output_keeps_the_stop_string_and_ends_there(bpe) -> None:
    s = TextStream(bpe, ["the end"], include=["the end"])
    out, stopped = "", False
    for t in bpe.encode("hello world, the end. more").ids:
        d = s.push(t)
        out += d.text
        if d.stopped:
            stopped = True
            break
    assert stopped and out == "hello world, the end"


@pytest.mark.parametrize(("spaces", "want"), [(True, "hello <|endoftext|> <|endoftext|> world"),
                                              (False, "hello<|endoftext|><|endoftext|>world")])
def test_shown_special_tokens_are_set_apart_by_spaces(bpe, spaces: bool, want: str) -> None:
    eos = bpe.token_to_id("<|endoftext|>")
    ids = bpe.encode("hello").ids + [eos, eos] + bpe.encode("world").ids
    skipped = TextStream(bpe, [])
    assert "".join(skipped.push(t).text for t in ids) + skipped.finish() == "helloworld"  # the default: no text
    shown = TextStream(bpe, [], special={eos: "<|endoftext|>"}, spaces=spaces)
    assert "".join(shown.push(t).text for t in ids) + shown.finish() == want
