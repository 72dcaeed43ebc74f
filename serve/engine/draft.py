"""A draft model for speculative decoding: a second artifact with the target's tokenizer, its own runner and slots.

The draft's cache has one slot per target slot (the same numbers), each holding a prefix of that
request's tokens: ``lengths[slot]`` of them. To propose for a row, the draft first catches up (the
tokens the target accepted since, one runner call per row: the whole prompt the first time), which
gives its guess for the next token; m - 1 decode calls, batched over the rows, give the rest. Drafts
are greedy (the draft's argmax), so each is a point mass and spec.py's acceptance rule is exact for
any sampling settings. The draft's own writes past the true tokens are kept where the target accepted
them (``keep``) and overwritten otherwise.

The draft's ONNX Runtime session runs on one thread (spec.py says why).

A draft must tokenize exactly as the target does: ``check_draft`` compares the tokenizers' vocabularies,
added (special) tokens, end-of-text ids and the models' vocabulary sizes, and refuses naming
``--draft-model``.

This module knows nothing about requests, sampling or HTTP: slots, token ids and lengths.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from nextoken.export.artifact import Artifact
from nextoken.export.runtime import Runner


def _tokenizer_facts(artifact: Artifact) -> dict[str, Any]:
    tok = json.loads(artifact.tokenizer_path.read_text(encoding="utf-8"))
    added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in tok.get("added_tokens", []))
    return {"vocabulary": tok["model"].get("vocab"), "merges": tok["model"].get("merges"), "added tokens": added,
            "end-of-text ids": list(artifact.eos_ids), "vocab_size": int(artifact.config["vocab_size"])}


def check_draft(target: Artifact, draft: Artifact) -> None:
    """Raise ValueError (naming --draft-model) unless ``draft`` tokenizes exactly as ``target``."""
    a, b = _tokenizer_facts(target), _tokenizer_facts(draft)
    for what in a:
        if a[what] != b[what]:
            def show(v: Any) -> str:
                return str(len(v)) + " entries" if isinstance(v, (list, dict)) and len(v) > 8 else repr(v)

            raise ValueError(f"--draft-model {draft.path}: its tokenizer differs from the served model's ({what}: "
                             f"{show(b[what])} against {show(a[what])}); a draft must share the target's tokenizer "
                             "(train one with `nextoken train --tokenizer-from ARTIFACT ...`)")


class DraftModel:
    """The draft's runner and, per slot, how many of the request's tokens its cache holds."""

    def __init__(self, artifact: Artifact, *, max_slots: int, max_len: int, device: str = "cpu",
                 threads: int = 0) -> None:
        context = int(artifact.config["n_positions"])
        self.runner = Runner(artifact, max_slots=max_slots, max_len=min(max_len, context), device=device,
                             threads=threads, spin_between_calls=False)
        self.max_len = self.runner.spec.max_len
        self.lengths = np.zeros(max_slots, dtype=np.int64)  # slot -> tokens of its request in the draft's cache
        self._written = np.zeros(max_slots, dtype=np.int64)  # slot -> draft tokens written past them (last propose)
        self.prompt_s = 0.0  # seconds the last propose spent reading new requests' prompts (once per request)

    def bind(self, slot: int) -> None:
        self.lengths[slot] = self._written[slot] = 0

    def room(self, n_tokens: int) -> int:
        """Draft tokens it can propose after a sequence of ``n_tokens`` (its context bounds it)."""
        return self.max_len - n_tokens  # d_0 .. d_{m-2} and a padding column past them fit

    def propose(self, rows: dict[int, tuple[np.ndarray, int]]) -> dict[int, np.ndarray]:
        """slot -> (the request's tokens (N,), draft length m): slot -> the draft's m greedy tokens."""
        guess: dict[int, list[int]] = {}
        self.prompt_s = 0.0
        for s, (tokens, _m) in rows.items():
            start = int(self.lengths[s])
            t0 = time.perf_counter()
            logits = self.runner.prefill(s, tokens[start:], start)  # (N - start, V): catch up
            if not start:  # the request's first proposal: its whole prompt, once per request
                self.prompt_s += time.perf_counter() - t0
            self.lengths[s] = tokens.size
            guess[s] = [int(logits[-1].argmax())]
        idle = self.lengths.copy()  # rows not in a decode call write a padding column here: past their drafts
        for s, (_t, m) in rows.items():
            idle[s] += m - 1
        j = 1
        while True:
            slots = np.fromiter((s for s, (_t, m) in rows.items() if m > j), dtype=np.int64)
            if not slots.size:
                break
            last = np.array([guess[s][-1] for s in slots.tolist()], dtype=np.int64)
            logits = self.runner.decode(slots, last, self.lengths[slots] + j - 1, idle)  # (n, V): d_{j-1} fed
            for s, t in zip(slots.tolist(), logits.argmax(axis=1).tolist(), strict=True):
                guess[s].append(int(t))
            j += 1
        for s, (_t, m) in rows.items():
            self._written[s] = m - 1  # d_0 .. d_{m-2} sit at lengths .. lengths + m - 2
        return {s: np.asarray(g, dtype=np.int64) for s, g in guess.items()}

    def keep(self, slot: int, accepted: int) -> None:
        """The target accepted ``accepted`` tokens of the slot's last draft: those the draft wrote stay valid."""
        self.lengths[slot] += min(accepted, int(self._written[slot]))
        self._written[slot] = 0
