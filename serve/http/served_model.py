"""The HTTP side's view of one model version: its tokenizer, its limits, and tokens as clients see them.

Made from the engine's ``ModelStatus`` (the artifact folder it names holds the tokenizer), once per
version this HTTP process serves; planning tokenizes with it, and it turns token ids into the
``LogprobEntry``s responses carry. It knows nothing about routes or the engine's internals.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from nextoken.serve.http.builder import Candidate, LogprobEntry
from nextoken.serve.tokens import TokenBytes
from nextoken.serve.wire import ModelStatus


class ServedModel:
    """The HTTP side's view of one model version: its tokenizer and limits (what planning needs)."""

    def __init__(self, status: ModelStatus) -> None:
        self.status = status
        self.path = status.path
        self.id = status.id
        self.name = status.name
        self.version = status.version
        self.context = status.max_model_len  # the longest sequence this server caches
        self.model_context = status.context
        self.eos_id = status.eos_id
        self.tokenizer = Tokenizer.from_file(str(Path(status.path) / "tokenizer.json"))
        self.created = int((Path(status.path) / "config.json").stat().st_mtime)
        self._vocab_size = self.tokenizer.get_vocab_size()
        # id -> text of each special token (<|endoftext|>...), shown only with skip_special_tokens: false
        self.special_texts = {i: t.content for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        self.token_bytes = TokenBytes(self.tokenizer)
        self._token_text: dict[int, str] = {}
        self._pieces: dict[int, tuple[str, list[int]]] = {}  # id -> (text, bytes), for logprob entries
        self._tokenizer_config: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            cfg = json.loads((Path(status.path) / "tokenizer_config.json").read_text(encoding="utf-8"))
            if isinstance(cfg, dict):
                self._tokenizer_config = cfg
        if not self._tokenizer_config.get("unk_token") and self.tokenizer.token_to_id("<unk>") is not None:
            self._tokenizer_config["unk_token"] = "<unk>"

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        t = self._token_text.get(token_id)
        if t is None:
            t = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return t

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        p = self._pieces.get(token_id)
        if p is None:
            p = self._pieces[token_id] = (self.token_text(token_id), list(self.token_bytes(token_id)))
        return p

    def logprob_entry(self, token_id: int, logprob: float, top_ids: Any, top_lps: Any) -> LogprobEntry:
        """A token with its log-probability and the alternatives the engine sent (ids (N,), logprobs (N,))."""
        top = []
        if top_ids is not None:
            for i, lp in zip(top_ids.tolist(), top_lps.tolist(), strict=True):
                text, raw = self._piece(i)
                top.append(Candidate(text, i, lp, raw))
        text, raw = self._piece(token_id)
        return LogprobEntry(text, token_id, logprob, raw, top)

    def tokenizer_config(self) -> dict[str, Any]:
        return dict(self._tokenizer_config)
