"""Character, word and byte-level BPE tokenizers, all saved as a Hugging Face ``tokenizer.json``.

Downstream code (export, serving, anyone's script) loads the result with
``tokenizers.Tokenizer.from_file`` and no project code. Every kind has the end-of-text token
``<|endoftext|>``, which separates documents and ends generation; char and word add ``<unk>``
for symbols never seen in training. Byte-level BPE round-trips any UTF-8 text exactly, and
char/word round-trip any text made of symbols they have seen, because their pre-tokenizers
keep every character (whitespace included) and their decoder concatenates without spaces.

The character vocabulary is saved as a BPE without merges, Llama-2 style (the space is ``▁`` in the
vocabulary, a normalizer maps " " to it and the decoder back): with no merges a BPE gives one
token per character, exactly as a character table does, and onnxruntime-genai's tokenizer reads
this form (a WordLevel model it cannot parse: "Cannot know how to parse line"). The one exception:
a corpus that itself holds ``▁`` keeps the space as " " (genai then splits spaces wrongly).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from nextoken.errors import UserError

EOT = "<|endoftext|>"
UNK = "<unk>"
KINDS = ("char", "word", "bpe")

# Words, single punctuation marks and single whitespace characters are each one token (runs of
# whitespace would make unseen run lengths <unk>); nothing is dropped.
_WORD_PATTERN = r"\w+|[^\w\s]|\s"
_CHAR_PATTERN = r"[\s\S]"  # any one character, newlines included
SPACE = "\u2581"  # "▁": the space in a character vocabulary (sentencepiece's convention)


def _char_or_word(kind: str, vocab_size: int) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.WordLevel(vocab={}, unk_token=UNK))
    # "isolated" keeps every matched piece as its own token.
    pattern = Regex(_CHAR_PATTERN if kind == "char" else _WORD_PATTERN)
    tok.pre_tokenizer = pre_tokenizers.Split(pattern, behavior="isolated")
    tok.decoder = decoders.Fuse()
    # A character vocabulary keeps every symbol seen; a word vocabulary keeps the most frequent.
    size = 1 << 24 if kind == "char" else vocab_size
    trainer = trainers.WordLevelTrainer(vocab_size=size, min_frequency=1, special_tokens=[EOT, UNK],
                                        show_progress=False)
    return tok, trainer


def _bpe(vocab_size: int) -> tuple[Tokenizer, trainers.Trainer]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
    """Learn a tokenizer of ``kind`` (char | word | bpe) from an iterable of documents."""
    if kind not in KINDS:
        raise UserError(f"must be one of {', '.join(KINDS)}, got {kind!r}", flag="--tokenizer")
    tok, trainer = _bpe(vocab_size) if kind == "bpe" else _char_or_word(kind, vocab_size)
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(EOT) is None:  # the trainers add special tokens first; check, never assume
        raise RuntimeError("trained tokenizer lacks the end-of-text token")
    if kind == "char":
        tok = char_bpe(tok.get_vocab())
    if kind == "word" and tok.get_vocab_size() < 3:
        raise UserError(f"the corpus yields only {tok.get_vocab_size()} word types", flag="--data")
    return tok


def char_bpe(vocab: dict[str, int]) -> Tokenizer:
    """A character vocabulary (character -> id, with EOT and UNK) as a BPE without merges (module docstring)."""
    escape = SPACE not in vocab
    pieces = {(k.replace(" ", SPACE) if escape else k): i for k, i in vocab.items()}
    tok = Tokenizer(models.BPE(vocab=pieces, merges=[], unk_token=UNK))
    if escape:
        tok.normalizer = normalizers.Replace(" ", SPACE)
        tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.Fuse()])
    else:
        tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False),
                            AddedToken(UNK, special=True, normalized=False)])
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no tokenizer at {p}")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:
        raise UserError(f"{p} is not a valid tokenizer.json: {e}") from None


def tokenizer_kind(tok: Tokenizer) -> str:
    """char (a BPE without merges, or an older character WordLevel), word or bpe."""
    model = json.loads(tok.to_str())["model"]
    if model["type"] == "BPE":
        return "bpe" if model.get("merges") else "char"
    return "char" if _CHAR_PATTERN.replace("\\", "\\\\") in tok.to_str() else "word"


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def document_token_id(tok: Tokenizer, folder: str | Path | None = None) -> int | None:
    """The token that separates documents and ends generation: ``<|endoftext|>`` for our tokenizers.

    A run started ``--init-from`` a Hugging Face folder keeps that folder's special tokens beside its
    tokenizer.json (``hf_tokens.TokenizerFiles``): there it is the folder's (first) end-of-sequence id.
    """
    if folder is not None:
        from nextoken.train.hf_tokens import TokenizerFiles

        files = TokenizerFiles.load(Path(folder))
        if files is not None and files.eos_token_ids:
            return files.eos_token_ids[0]
    return tok.token_to_id(EOT)


def special_token_ids(tok: Tokenizer, folder: str | Path | None = None) -> dict[str, int | None]:
    return {"eos_token_id": document_token_id(tok, folder), "unk_token_id": tok.token_to_id(UNK)}


def batched(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
