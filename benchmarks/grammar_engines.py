"""The grammar engines bench_grammar.py compares, each wrapped in one interface (``Candidate``) over its own public
API, and the vocabulary they all take (``Vocab``: token bytes, EOS, special tokens).

A candidate compiles a workload (a JSON schema or a regex) once, makes a matcher per sequence from it, fills a
batch's int32 bitmask of allowed tokens per step, and advances each matcher by its token. ``CANDIDATES`` maps a
name to the module it needs (measured only if that imports) and its class.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Vocab:
    name: str
    tokenizer_json: str
    tokens: list[bytes]  # id -> bytes (TokenBytes)
    eos_id: int
    special: list[int]  # special token ids, EOS included

    @property
    def size(self) -> int:
        return len(self.tokens)


# --- candidates: each wraps one engine's own public API --------------------------------------------
class Candidate:
    name = ""

    def setup(self, v: Vocab) -> None:
        """Per-vocabulary work done once per model version (not part of compile time)."""

    def compile(self, kind: str, payload: Any) -> Any:  # -> a compiled grammar
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, matchers: list[Any], bits: np.ndarray) -> None:  # bits (B, words) int32
        raise NotImplementedError

    def allowed(self, bits: np.ndarray, v: Vocab) -> np.ndarray:
        """(B, n_tokens) bool from what ``fill`` wrote (not timed): the driver draws the next tokens from it."""
        return np.unpackbits(bits.view(np.uint8), axis=1, count=v.size, bitorder="little").view(bool)

    def accept(self, m: Any, token: int) -> None:
        raise NotImplementedError

    def done(self, m: Any) -> bool:
        raise NotImplementedError


class _TokenizerLike:
    """What llguidance.TokenizerWrapper reads."""

    def __init__(self, v: Vocab) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(v.tokenizer_json)
        self.tokens, self.eos_token_id, self.bos_token_id, self.special_token_ids = v.tokens, v.eos_id, None, v.special

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("str only")
        return self._tok.encode(text, add_special_tokens=False).ids


class LLGuidance(Candidate):
    name = "llguidance"

    def setup(self, v: Vocab) -> None:
        import llguidance as llg

        self.llg = llg
        self.tok = llg.LLTokenizer(llg.TokenizerWrapper(_TokenizerLike(v)))
        self.executor = llg.LLExecutor(num_threads=1)

    def compile(self, kind: str, payload: Any) -> Any:
        M = self.llg.LLMatcher
        g = (M.grammar_from_json_schema(payload, overrides={"whitespace_flexible": False}) if kind == "json"
             else M.grammar_from_regex(payload))
        m = M(self.tok, g, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matchers: list[Any], bits: np.ndarray) -> None:
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bits.ctypes.data,
                                              bits.shape[1] * 4, bits.shape[0])

    def accept(self, m: Any, token: int) -> None:
        assert m.consume_token(token), m.get_error()

    def done(self, m: Any) -> bool:
        return m.is_stopped()


class NextokenGrammar(Candidate):
    """llguidance through serve/engine/grammar.py, as the server runs it: fill_masks (float32 bias) + apply_masks."""

    name = "nextoken"
    threads = 0  # GrammarConfig.threads: 0 = in the engine thread

    def setup(self, v: Vocab) -> None:
        from nextoken.serve.engine import grammar

        self.g = grammar
        self.compiler = grammar.GrammarCompiler(v.tokenizer_json, v.size, v.eos_id,
                                                grammar.GrammarConfig(threads=self.threads))
        self.bias: np.ndarray | None = None

    def compile(self, kind: str, payload: Any) -> Any:
        self.compiler._cache.clear()  # cold: time the real compile, not the LRU hit
        from nextoken.serve.wire import StructuredKind, StructuredSpec

        if kind == "json":
            schema = json.loads(payload) if isinstance(payload, str) else payload
            spec = StructuredSpec(StructuredKind.JSON_SCHEMA, "guided_json", schema=schema)
        else:  # a regex is a string too: never parsed as JSON
            spec = StructuredSpec(StructuredKind.REGEX, "guided_regex", regex=payload)
        self.compiler.compile(spec)
        return spec

    def matcher(self, compiled: Any) -> Any:
        return self.compiler.compile(compiled)

    def fill(self, matchers: list[Any], bits: np.ndarray) -> None:
        B, V = len(matchers), self.compiler.vocab_size
        if self.bias is None or self.bias.shape[0] != B:
            self.bias = np.zeros((B, V), dtype=np.float32)
            self.logits = np.zeros((B, V), dtype=np.float32)
        rows = self.compiler.fill_masks(matchers, self.bias)
        self.g.apply_masks(self.logits, self.bias, rows)  # the server's full per-step cost

    def allowed(self, bits: np.ndarray, v: Vocab) -> np.ndarray:
        return self.bias[:, :v.size] == 0

    def accept(self, m: Any, token: int) -> None:
        m.accept(token)

    def done(self, m: Any) -> bool:
        return m.is_terminated()


class NextokenGrammarPool(NextokenGrammar):
    """The same, with masks on llguidance's thread pool (GrammarConfig(threads=1))."""

    name = "nextoken-pool1"
    threads = 1


class OutlinesCore(Candidate):
    name = "outlines-core"

    def setup(self, v: Vocab) -> None:
        import outlines_core as oc

        self.oc = oc
        mapping: dict[bytes, list[int]] = {}
        for i, b in enumerate(v.tokens):
            if i not in v.special:
                mapping.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(v.eos_id, mapping)

    def compile(self, kind: str, payload: Any) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(payload), "") if kind == "json" else payload
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matchers: list[Any], bits: np.ndarray) -> None:
        W = bits.shape[1]
        for i, g in enumerate(matchers):  # outlines-core has no batch call
            row = bits[i]
            g.write_mask_into(row.ctypes.data, W, 4)

    def accept(self, m: Any, token: int) -> None:
        m.advance(token, return_tokens=False)

    def done(self, m: Any) -> bool:
        return m.is_finished()


class XGrammar(Candidate):
    name = "xgrammar"

    def setup(self, v: Vocab) -> None:
        import xgrammar as xg

        self.xg = xg
        # xgrammar takes empty entries as special tokens; EOS is named as the stop token
        encoded = [b"" if i in v.special else b for i, b in enumerate(v.tokens)]
        self.info = xg.TokenizerInfo(encoded, xg.VocabType.RAW, vocab_size=v.size, stop_token_ids=[v.eos_id])
        self.batch = xg.BatchGrammarMatcher(max_threads=1)

    def compile(self, kind: str, payload: Any) -> Any:
        c = self.xg.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        if kind == "json":
            return c.compile_json_schema(json.dumps(payload), any_whitespace=False, separators=(",", ":"))
        return c.compile_regex(payload)

    def matcher(self, compiled: Any) -> Any:
        return self.xg.GrammarMatcher(compiled)

    def fill(self, matchers: list[Any], bits: np.ndarray) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bits)

    def accept(self, m: Any, token: int) -> None:
        assert m.accept_token(token)

    def done(self, m: Any) -> bool:
        return m.is_terminated()


CANDIDATES: dict[str, tuple[str, Callable[[], Candidate]]] = {
    "llguidance": ("llguidance", LLGuidance),
    "nextoken": ("llguidance", NextokenGrammar),
    "nextoken-pool1": ("llguidance", NextokenGrammarPool),
    "outlines-core": ("outlines_core", OutlinesCore),
    "xgrammar": ("xgrammar", XGrammar),
}
