"""Detokenization: multi-byte characters across tokens, stop strings never split nor emitted."""

from __future__ import annotations

import pytest

from nextoken.serve.http.textstream import TextStream
from nextoken.train.tokenizer import train_tokenizer
from tests.tokenizer_styles import STYLES


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


@pytest.mark.parametrize("style", sorted(STYLES))
def test_streamed_text_is_the_decoded_output_in_every_style(style: str) -> None:
    """Token by token after a prompt, the deltas join to what decoding the whole output gives: byte-fallback
    pieces (<0xE2><0x82><0xAC>) come out as one whole character, and a Metaspace word keeps its leading space
    even as the first token of the output."""
    tok, _ = STYLES[style]()
    prompt = tok.encode("The quick brown").ids  # with the BOS the tokenizer adds
    # (a SentencePiece normalizer writes the leading space itself: "fox" is "▁fox")
    words = "fox € 😀 jumps, wörld!" if style == "metaspace_bpe" else " fox € 😀 jumps, wörld!"
    output = tok.encode(words, add_special_tokens=False).ids
    expected = tok.decode(prompt + output)[len(tok.decode(prompt)):]
    assert expected.startswith(" fox")
    s = TextStream(tok, [], context=prompt)
    pieces = [s.push(t).text for t in output] + [s.finish()]
    assert "".join(pieces) == expected
    assert not any("\ufffd" in p for p in pieces)
    if style == "metaspace_bpe":
        assert sum(tok.id_to_token(t).startswith("<0x") for t in output) >= 7  # € and 😀 are byte pieces there
        alone = TextStream(tok, [])  # without the prompt, the first word's space is lost (why context exists)
        assert "".join([alone.push(t).text for t in output] + [alone.finish()]) == expected.lstrip(" ")


def test_a_stop_string_across_byte_fallback_pieces() -> None:
    tok, _ = STYLES["metaspace_bpe"]()
    prompt = tok.encode("The").ids
    s = TextStream(tok, ["€"], context=prompt)
    pieces = []
    for t in tok.encode("price 5€ and more", add_special_tokens=False).ids:
        d = s.push(t)
        pieces.append(d.text)
        if d.stopped:
            break
    assert d.stopped and "".join(pieces) == " price 5"


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
