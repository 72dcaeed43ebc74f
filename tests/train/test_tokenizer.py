"""Tokenizers: exact round trips (property-based), <unk> for unseen symbols, end-of-text, JSON portability."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from nextoken.errors import UserError
from nextoken.train.tokenizer import EOT, UNK, tokenizer_kind, train_tokenizer

CORPUS = ["The sky is blue.\nThe cat sat on the mat!\n\tdef f(x):  return x ** 2  # ünïcödé ✓\n"] * 20


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    return {kind: train_tokenizer(kind, CORPUS, vocab_size=300) for kind in ("char", "word", "bpe")}


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_bpe_round_trips_any_unicode(toks, text: str) -> None:
    tok = toks["bpe"]
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=sorted(set("".join(CORPUS))), max_size=200))
def test_char_round_trips_seen_symbols(toks, text: str) -> None:
    tok = toks["char"]
    ids = tok.encode(text).ids
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from(["The", "sky", "is", "blue", "cat", "x", "return"]),
                                st.sampled_from([" ", "\n", ".", "  ", "\t", "!", " ** "])), max_size=40))
def test_word_round_trips_seen_words(toks, pairs: list[tuple[str, str]]) -> None:
    tok = toks["word"]
    text = "".join(word + sep for word, sep in pairs)  # a separator between words, or they fuse into a new word
    assert tok.decode(tok.encode(text).ids) == text


@pytest.mark.parametrize("kind", ["char", "word"])
def test_unseen_symbols_become_unk(toks, kind: str) -> None:
    tok = toks[kind]
    ids = tok.encode("sky 日本").ids
    assert tok.token_to_id(UNK) in ids
    assert tok.id_to_token(ids[0]) == ("s" if kind == "char" else "sky")


def test_every_kind_has_end_of_text_as_one_token(toks) -> None:
    for tok in toks.values():
        eot = tok.token_to_id(EOT)
        assert eot is not None
        assert tok.encode(f"sky{EOT}blue").ids.count(eot) == 1


def test_saved_json_loads_without_project_code(toks, tmp_path) -> None:
    for kind, tok in toks.items():
        path = tmp_path / f"{kind}.json"
        tok.save(str(path))
        again = Tokenizer.from_file(str(path))
        assert again.encode("The cat sat").ids == tok.encode("The cat sat").ids
        assert tokenizer_kind(again) == kind


def test_bpe_vocab_size_is_respected(toks) -> None:
    assert 257 <= toks["bpe"].get_vocab_size() <= 300


def test_unknown_kind_names_the_flag() -> None:
    with pytest.raises(UserError, match="--tokenizer"):
        train_tokenizer("sentencepiece", CORPUS)
