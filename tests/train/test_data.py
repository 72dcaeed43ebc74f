"""Data pipeline: sources, streaming tokenization into a memmap, split, windows, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nextoken.errors import UserError
from nextoken.train.data import (
    TokenData,
    WindowSampler,
    eval_starts,
    tokenize_corpus,
    windows,
)
from nextoken.train.sources import default_corpus_files, resolve_sources
from nextoken.train.tokenizer import EOT, train_tokenizer


def test_builtin_corpus_is_the_standard_library() -> None:
    files = default_corpus_files()
    assert len(files) > 100
    assert any(f.name == "functools.py" for f in files)
    assert sum(f.stat().st_size for f in files) > 2_000_000  # multi-megabyte


def test_sources_expand_files_folders_globs(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "c.bin").write_bytes(b"\x00")
    assert resolve_sources([str(tmp_path)]) == [tmp_path / "a.txt", tmp_path / "sub" / "b.md"]
    assert resolve_sources([str(tmp_path / "**" / "*.md")]) == [tmp_path / "sub" / "b.md"]
    # the same file twice is read once
    assert resolve_sources([str(tmp_path / "a.txt"), str(tmp_path / "a.txt")]) == [tmp_path / "a.txt"]


@pytest.mark.parametrize("spec", ["missing.txt", "nothing-*.txt"])
def test_missing_sources_name_the_flag(tmp_path, spec) -> None:
    with pytest.raises(UserError, match="--data"):
        resolve_sources([str(tmp_path / spec)])


def test_tokenized_file_is_memmapped_with_manifest_and_split(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("hello world\n" * 100)
    (tmp_path / "b.txt").write_text("second doc\n" * 100)
    files = resolve_sources([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    tok = train_tokenizer("char", ["hello world\nsecond doc\n"])
    m = tokenize_corpus(files, tok, tmp_path / "data", val_fraction=0.1, progress=False)
    assert m.num_documents == 2 and m.num_chars == 2300
    assert m.num_tokens == 2300 + 1  # one end-of-text between the two documents
    assert m.dtype == "uint16" and m.split == int(m.num_tokens * 0.9)
    data = TokenData(tmp_path / "data")
    assert isinstance(data.train, np.memmap)
    assert len(data.train) + len(data.val) == m.num_tokens
    assert int(data.train[1200]) == tok.token_to_id(EOT)
    assert tok.decode(data.train[:11].tolist()) == "hello world"
    saved = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert saved["tokenizer_sha256"] == m.tokenizer_sha256
    # a second call with the same inputs reuses the file
    mtime = (tmp_path / "data" / "tokens.bin").stat().st_mtime_ns
    tokenize_corpus(files, tok, tmp_path / "data", val_fraction=0.1, progress=False)
    assert (tmp_path / "data" / "tokens.bin").stat().st_mtime_ns == mtime


def test_jsonl_documents_and_text_field(tmp_path) -> None:
    p = tmp_path / "docs.jsonl"
    p.write_text('{"body": "first"}\n\n{"body": "second"}\n')
    tok = train_tokenizer("char", ["firstsecond"])
    m = tokenize_corpus([p], tok, tmp_path / "d", text_field="body", progress=False)
    assert m.num_documents == 2 and m.num_tokens == len("first") + 1 + len("second")
    with pytest.raises(UserError, match="--text-field"):
        tokenize_corpus([p], tok, tmp_path / "e", text_field="text", progress=False)


def test_non_utf8_and_empty_corpora_are_clear_errors(tmp_path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    tok = train_tokenizer("char", ["cafe"])
    with pytest.raises(UserError, match="not UTF-8"):
        tokenize_corpus([bad], tok, tmp_path / "d", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        tokenize_corpus([empty], tok, tmp_path / "e", progress=False)


def test_large_files_are_read_in_chunks_without_losing_text(tmp_path, monkeypatch) -> None:
    import nextoken.train.data as data_mod

    monkeypatch.setattr(data_mod, "CHUNK_CHARS", 100)  # force many chunks
    text = "".join(f"line {i} of the corpus\n" for i in range(500))
    (tmp_path / "big.txt").write_text(text)
    tok = train_tokenizer("char", [text])
    m = tokenize_corpus([tmp_path / "big.txt"], tok, tmp_path / "d", progress=False)
    data = TokenData(tmp_path / "d")
    allt = np.concatenate([data.train, data.val])
    assert m.num_documents == 1 and tok.decode(allt.tolist()) == text


def test_windows_shift_targets_by_one() -> None:
    tokens = np.arange(100, dtype=np.uint16)
    x, y = windows(tokens, np.array([0, 10]), 8)
    assert x.shape == (2, 8) and x.dtype.is_floating_point is False
    assert x[1].tolist() == list(range(10, 18)) and y[1].tolist() == list(range(11, 19))


def test_sampler_is_reproducible_and_resumable() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    a = WindowSampler(tokens, 16, 4, seed=1)
    a.next_batch()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    expected = a.next_batch()[0]
    b = WindowSampler(tokens, 16, 4, seed=999)
    b.load_state_dict(state)
    assert b.next_batch()[0].equal(expected)


def test_eval_windows_are_fixed_and_in_range() -> None:
    s = eval_starts(500, 16, 10)
    assert s.tolist() == eval_starts(500, 16, 10).tolist()
    assert s.min() == 0 and s.max() + 16 + 1 <= 500
