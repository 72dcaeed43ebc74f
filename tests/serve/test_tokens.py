"""serve/tokens.py: each token's exact bytes (even part of a character), a prompt's special tokens, the end ids."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from nextoken.export.artifact import eos_ids
from nextoken.serve.tokens import ModelTokenizer, TokenBytes
from nextoken.train.tokenizer import train_tokenizer
from tests.tokenizer_styles import STYLES


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


# --- the tokenizer styles hub models ship (tests/tokenizer_styles.py) ----------------------------
TEXT = "Hello wörld, the fox € 😀 jumps; 日本."


@pytest.mark.parametrize("style", sorted(STYLES))
def test_token_bytes_rebuild_the_text_in_every_style(style: str) -> None:
    """Byte-level pieces, <0xHH> byte-fallback pieces and ▁-spaced pieces all give back the text's UTF-8."""
    tok, _ = STYLES[style]()
    tb = TokenBytes(tok)
    ids = tok.encode(TEXT, add_special_tokens=False).ids
    joined = b"".join(tb(i) for i in ids)
    # SentencePiece-style vocabularies write the text's first word with a leading ▁ (its normalizer adds it)
    assert joined.decode("utf-8") == (" " + TEXT if style == "metaspace_bpe" else TEXT)
    if style == "metaspace_bpe":
        assert any(tok.id_to_token(i).startswith("<0x") for i in ids)  # the test covers byte fallback
        assert tb(tok.token_to_id("</s>")) == b"</s>"  # a special token is its text, ▁ or not


def _model_tokenizer(style: str, *, eos: list[int] | None = None, nextoken: bool = False) -> ModelTokenizer:
    tok, specials = STYLES[style]()
    eos_id = tok.token_to_id(specials["eos_token"])
    config = {"eos_token_id": eos_id, **({"tokenizer_kind": "bpe"} if nextoken else {})}
    gen = {"eos_token_id": eos} if eos is not None else {}
    with tempfile.TemporaryDirectory() as d:
        tok.save(str(Path(d) / "tokenizer.json"))
        (Path(d) / "tokenizer_config.json").write_text(json.dumps(specials), encoding="utf-8")
        return ModelTokenizer.from_folder(d, config, gen)


def test_a_prompt_gets_the_tokenizers_own_special_tokens_and_never_two() -> None:
    llama2 = _model_tokenizer("metaspace_bpe")
    ids = llama2.encode_prompt("the fox")
    assert ids[0] == llama2.tokenizer.token_to_id("<s>") and ids[1:] == llama2.encode("the fox")
    assert llama2.encode_prompt("the fox", add_special_tokens=False) == llama2.encode("the fox")
    qwen = _model_tokenizer("regex_bpe")  # regex_bpe() adds <|begin_of_text|> like Llama-3
    assert qwen.encode_prompt("fox")[0] == qwen.tokenizer.token_to_id("<|begin_of_text|>")
    # a model nextoken trained: documents started after its end-of-text, so a prompt does too
    ours = _model_tokenizer("byte_bpe", nextoken=True)
    assert ours.encode_prompt("fox") == [ours.eos_id, *ours.encode("fox")]
    # ... unless its tokenizer already adds a BOS of its own: one start token, not two
    both = _model_tokenizer("metaspace_bpe", nextoken=True)
    assert both.prefix_id is None and both.encode_prompt("fox") == llama2.encode_prompt("fox")
    assert both.special_token_text("bos_token") == "<s>" and both.special_token_text("pad_token") is None


def test_every_end_of_text_id_from_both_configs() -> None:
    """Llama-3 instruct: config.json names <|end_of_text|>, generation_config.json a list with <|eot_id|>."""
    tok, _ = STYLES["regex_bpe"]()
    end, eot = tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")
    assert eos_ids({"eos_token_id": end}, {"eos_token_id": [end, eot]}) == [end, eot]
    assert eos_ids({"eos_token_id": eot}, {"eos_token_id": end}) == [eot, end]
    assert eos_ids({"eos_token_id": [eot, end]}, {}) == [eot, end]
    assert eos_ids({"eos_token_id": None}, {"eos_token_id": True}) == []
    m = _model_tokenizer("regex_bpe", eos=[end, eot])
    assert m.eos_ids == (eot, end) and m.eos_id == eot
