"""Corpus -> memory-mapped token file -> training windows.

A corpus is any mix of text files, folders (searched recursively for text files), globs and
``.jsonl`` files (one document per line, text under ``--text-field``); which files that is,
``sources`` says. With none given, the built-in corpus is the Python standard library's own
source: every Python installation has it, so the quickstart works offline.

Tokenization runs once, streaming: documents are read in chunks, encoded in batches by the
Rust tokenizer, and appended to ``tokens.bin`` (uint16 when the vocabulary fits, else uint32),
so a corpus larger than memory works. ``manifest.json`` records the tokenizer hash, the
sources, the counts and the train/val split point (the first ``1 - val_fraction`` of tokens
train, the rest validate, as nanoGPT splits a single file). Training reads random windows
through the memory map; evaluation reads fixed, evenly spaced windows so val loss is
comparable across runs and resumes.

Document masking (``--doc-mask``, ``document_layout``): windows stay random and packed (every
token of the corpus can be trained on, no padding), and the mask is explicit instead: a token
attends only to earlier tokens of its own document and counts its position from that
document's ``<|endoftext|>``, which is exactly what it sees when served (a prompt starts with
``<|endoftext|>`` at position 0). Windows that *start* at a boundary were the alternative: here
documents are far longer than a context (a stdlib file is thousands of tokens; tinyshakespeare
is one document), so that would train on the first block of each document only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from nextoken.errors import UserError
from nextoken.train.config import TrainConfig
from nextoken.train.tokenizer import EOT, batched, tokenizer_hash

CHUNK_CHARS = 1 << 16  # documents are read and encoded in pieces of about this many characters
MANIFEST_VERSION = 1


def _read_chunks(path: Path, text_field: str) -> Iterator[tuple[str, bool]]:
    """Yield (text, ends_document) pieces of one file."""
    try:
        if path.suffix.lower() == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg})", flag="--data") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                        raise UserError(f"{path}:{lineno} has no string field {text_field!r}",
                                        flag="--text-field") from None
                    yield obj[text_field], True
            return
        with open(path, encoding="utf-8", newline="") as f:
            pending = f.read(CHUNK_CHARS)
            while pending:
                nxt = f.read(CHUNK_CHARS)
                if nxt:
                    # cut at the last newline so no word is split between two encode calls
                    cut = pending.rfind("\n") + 1 or len(pending)
                    nxt = pending[cut:] + nxt
                    pending = pending[:cut]
                yield pending, not nxt
                pending = nxt
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})", flag="--data") from None


def iter_chunks(files: list[Path], text_field: str = "text", max_chars: int = 0) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of the whole corpus, stopping after ``max_chars`` if set."""
    total = 0
    for path in files:
        for text, ends in _read_chunks(path, text_field):
            if max_chars and total + len(text) >= max_chars:
                yield text[: max_chars - total], True
                return
            total += len(text)
            if text:
                yield text, ends


def iter_documents(files: list[Path], text_field: str = "text", max_chars: int = 0) -> Iterator[str]:
    for text, _ in iter_chunks(files, text_field, max_chars):
        yield text


@dataclass
class DataManifest:
    version: int
    tokenizer_sha256: str
    sources: list[str]
    text_field: str
    max_corpus_chars: int
    num_documents: int
    num_chars: int
    num_tokens: int
    dtype: str
    val_fraction: float
    split: int  # tokens[:split] train, tokens[split:] validate

    def matches(self, other: DataManifest) -> bool:
        keys = ("version", "tokenizer_sha256", "sources", "text_field", "max_corpus_chars", "val_fraction")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenize_corpus(files: list[Path], tokenizer: Tokenizer, out_dir: Path, *, text_field: str = "text",
                    max_chars: int = 0, val_fraction: float = 0.1, progress: bool = True,
                    eot_id: int | None = None) -> DataManifest:
    """Encode the corpus into ``out_dir/tokens.bin`` + ``manifest.json`` (reused when they match).

    Documents are separated by ``eot_id`` (default: ``<|endoftext|>``; an --init-from folder's eos).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    eot = tokenizer.token_to_id(EOT) if eot_id is None else eot_id
    dtype = token_dtype(tokenizer.get_vocab_size())
    wanted = DataManifest(MANIFEST_VERSION, tokenizer_hash(tokenizer), [str(f) for f in files], text_field,
                          max_chars, 0, 0, 0, dtype.name, val_fraction, 0)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file() and (out_dir / "tokens.bin").is_file():
        try:
            have = DataManifest(**json.loads(manifest_path.read_text()))
            if have.matches(wanted) and (out_dir / "tokens.bin").stat().st_size == have.num_tokens * dtype.itemsize:
                return have
        except (TypeError, ValueError):
            pass  # an older or damaged manifest: tokenize again

    total_bytes = sum(f.stat().st_size for f in files)
    if max_chars:
        total_bytes = min(total_bytes, max_chars)
    tmp = out_dir / "tokens.bin.tmp"
    n_docs = n_chars = n_tokens = 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress, leave=False)
    with open(tmp, "wb") as f:
        pieces = iter_chunks(files, text_field, max_chars)
        at_doc_start = False
        for group in batched(pieces, 64):  # many pieces per call: the Rust encoder uses every core
            encoded = tokenizer.encode_batch([t for t, _ in group], add_special_tokens=False)
            for (text, ends), enc in zip(group, encoded, strict=True):
                ids = enc.ids
                if at_doc_start:
                    ids = [eot] + ids  # end-of-text separates documents (none after the last)
                at_doc_start = ends
                n_docs += ends
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                n_tokens += len(ids)
                n_chars += len(text)
                bar.update(len(text))
        f.flush()
        os.fsync(f.fileno())
    bar.close()
    if n_tokens == 0 or n_chars == 0:
        tmp.unlink(missing_ok=True)
        raise UserError("the corpus is empty", flag="--data")
    os.replace(tmp, out_dir / "tokens.bin")
    split = int(n_tokens * (1 - val_fraction))
    manifest = DataManifest(MANIFEST_VERSION, wanted.tokenizer_sha256, wanted.sources, text_field, max_chars,
                            n_docs, n_chars, n_tokens, dtype.name, val_fraction, split)
    tmp_manifest = out_dir / "manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(asdict(manifest), indent=2))
    os.replace(tmp_manifest, manifest_path)
    return manifest


class TokenData:
    """The train and val token streams of a prepared folder, read through one memory map."""

    def __init__(self, folder: Path) -> None:
        self.manifest = DataManifest(**json.loads((folder / "manifest.json").read_text()))
        tokens = np.memmap(folder / "tokens.bin", dtype=np.dtype(self.manifest.dtype), mode="r")
        self.train = tokens[: self.manifest.split]
        self.val = tokens[self.manifest.split:]

    def check_block_size(self, block_size: int) -> None:
        for name, part in (("train", self.train), ("validation", self.val)):
            if len(part) < block_size + 1:
                raise UserError(f"the {name} split has {len(part)} tokens, fewer than block size + 1 = "
                                f"{block_size + 1}; use more text or a smaller --block-size", flag="--block-size")


def windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs = tokens[i:i+T], targets = tokens[i+1:i+T+1] for each start i -> two (B, T) int64 tensors."""
    block = np.stack([np.asarray(tokens[i: i + block_size + 1], dtype=np.int64) for i in starts])  # (B, T+1)
    t = torch.from_numpy(block)
    return t[:, :-1], t[:, 1:]


def document_layout(x: torch.Tensor, eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Document ids and in-document positions for windows x (B, T) -> two (B, T) int64 tensors.

    ``<|endoftext|>`` opens a document (it separates them in ``tokens.bin``, and a served
    prompt starts with it), so it takes position 0 of the new document. Tokens before a
    window's first separator continue a document that started outside the window: their
    positions count from the window's start, as without masking.
    """
    B, T = x.shape
    starts = x == eot_id  # (B, T)
    document_ids = starts.long().cumsum(1)  # (B, T)
    idx = torch.arange(T, device=x.device).expand(B, T)  # (B, T)
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values  # (B, T)
    return document_ids, idx - last_start


def model_inputs(x: torch.Tensor, cfg: TrainConfig, eot_id: int | None) -> dict[str, torch.Tensor]:
    """Keyword inputs besides the token ids: document ids and positions when ``doc_mask`` is on."""
    if not cfg.doc_mask:
        return {}
    assert eot_id is not None  # the loop refuses doc_mask without an end-of-text token
    document_ids, position_ids = document_layout(x, eot_id)  # each (B, T)
    return {"document_ids": document_ids, "position_ids": position_ids}


class WindowSampler:
    """Random training windows, reproducible from a seed and resumable from its state."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int) -> None:
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        high = len(self.tokens) - self.block_size
        starts = torch.randint(high, (self.batch_size,), generator=self.generator).numpy()
        return windows(self.tokens, starts, self.block_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def eval_starts(n_tokens: int, block_size: int, count: int) -> np.ndarray:
    """Fixed, evenly spaced window starts covering the split (the same in every run)."""
    high = n_tokens - block_size - 1
    return np.linspace(0, max(high, 0), num=count).astype(np.int64)
