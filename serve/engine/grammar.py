"""Structured output on the token level: a request's grammar becomes a mask over the model's vocabulary.

The grammar engine is llguidance (PyPI, no dependencies, no PyTorch). It was chosen over outlines-core
and xgrammar by measured per-step mask time at batch 32 on our vocabularies, compile time and
dependency weight (benchmarks/bench_grammar.py has the comparison). Kinds of structure:

- ``json_object``: any JSON object (OpenAI ``response_format: {"type": "json_object"}``),
- ``json_schema``: OpenAI ``response_format: {"type": "json_schema", "json_schema": {name, schema, strict}}``,
- vLLM's ``structured_outputs`` ``json`` / ``regex`` / ``choice`` / ``grammar`` (and their old names
  ``guided_json`` / ...): a JSON schema, a regular expression the whole output must match, a list of
  allowed outputs, a Lark or GBNF grammar; ``whitespace_pattern`` (``guided_whitespace_pattern``)
  replaces the whitespace allowed between JSON tokens, and the empty pattern allows none.

Surface, for the engine process (one ``GrammarCompiler`` per model version)::

    compiler = GrammarCompiler(tokenizer_json, vocab_size, eos_id)
    matcher = compiler.compile(spec)          # a wire.StructuredSpec; GrammarError(message, param): a 400
    bias = np.zeros((B, vocab_size), np.float32)    # reused every step (or bool: True = allowed)
    rows = compiler.fill_masks(matchers, bias)      # matchers: one Matcher | None per batch row
    apply_masks(logits, bias, rows)           # logits (B, V) float32, in place: -inf where not allowed
    ...sample...
    matcher.accept(token_id)                  # every row with a matcher; TokenRejected means a sampler bug
    matcher.is_terminated()                   # the grammar is complete: only EOS is allowed from now on

The request contract validated the spec's shape; ``compile`` refuses what llguidance cannot enforce
(invalid schemas, regexes and grammars, a vocabulary that cannot start the output) with a
``GrammarError`` naming the request field, which the engine answers as a 400. ``compile`` may run on
any thread (its cache is locked); ``fill_masks`` and a Matcher belong to one thread at a time.

NOTE on the mask format: ``fill_masks`` writes an additive float32 bias (0 = allowed, -inf = not) rather
than a bool mask (a bool one is available too). Adding it is branch-free: on (32, 4096) float32 logits
``np.add(logits, bias, out=logits)`` took ~0.07 ms where every masked write (``np.copyto(..., where=)``,
``np.where``, boolean indexing) took ~1 ms, as a masked copy branches on each element. The bias is
made from llguidance's bitmask with integer ops only (no per-element branch either).

Token ids at or above the tokenizer's size (the model's padded rows) and special tokens other than
EOS are never allowed; EOS is allowed exactly when the grammar accepts what came so far. When a row's
grammar cannot be continued by any token of the vocabulary (a character vocabulary that lacks a
character the grammar needs), the row gets EOS only so that the sequence ends, and the matcher
records why (``Matcher.error``); a grammar whose very first step is such a dead end is refused at
compile time.

This module knows nothing about HTTP, sampling or ONNX Runtime.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import llguidance as llg
import numpy as np
from tokenizers import Tokenizer

from nextoken.serve.tokens import TokenBytes
from nextoken.serve.wire import StructuredKind, StructuredSpec

# JSON whitespace between tokens, at most 16 characters per gap: a tiny or confused model can otherwise
# fill max_tokens with spaces and newlines (llguidance's default pattern is unbounded), while indented,
# pretty-printed JSON still fits.
DEFAULT_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,16}"
_NEG_INF_BITS = np.int32(-8388608)  # 0xFF800000, float32 -inf


class GrammarError(ValueError):
    """A structured-output request that cannot be honoured; ``param`` is the request field to name in the 400."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class TokenRejected(RuntimeError):
    """A token the row's mask did not allow reached ``Matcher.accept``: a bug in applying the masks."""


@dataclass
class GrammarConfig:
    cache_size: int = 128  # compiled grammars kept (LRU), per compiler
    # 0: masks are computed in the calling (engine) thread, one row after another; N >= 1: on llguidance's
    # own pool of N threads (rayon), which pays off only with cores to spare beside ONNX Runtime
    threads: int = 0
    whitespace: str = DEFAULT_WHITESPACE  # JSON whitespace between tokens, unless a request sets its own

    def __post_init__(self) -> None:
        if self.cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {self.cache_size}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")


def _grammar_text(spec: StructuredSpec, config: GrammarConfig) -> str:
    """The llguidance grammar for ``spec`` (also the cache key: equal grammars compile once)."""
    if spec.kind in (StructuredKind.JSON_OBJECT, StructuredKind.JSON_SCHEMA):
        schema = spec.schema if spec.kind == StructuredKind.JSON_SCHEMA else {"type": "object"}
        if spec.whitespace is not None:
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(
                llg.LLMatcher.grammar_from_regex(spec.whitespace))
            if is_error:
                raise GrammarError(f"invalid {spec.whitespace_param}: {_one_line(messages[0] if messages else '')}",
                                   spec.whitespace_param)
        # Unsupported schema keywords are refused (lenient=False), never silently unenforced.
        options = {"whitespace_pattern": spec.whitespace if spec.whitespace is not None else config.whitespace,
                   "lenient": False}
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid JSON schema: {e}", spec.param) from None
    if spec.kind == StructuredKind.REGEX:
        return llg.LLMatcher.grammar_from_regex(spec.regex)
    if spec.kind == StructuredKind.CHOICE:
        # Each choice is a Lark string literal: json.dumps escapes quotes, backslashes and controls.
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                      for c in spec.choices))
    try:
        return llg.grammar_from("grammar", spec.grammar)  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise GrammarError(f"invalid grammar: {e}", spec.param) from None


def _error_message(spec: StructuredSpec, error: str) -> str:
    what = {StructuredKind.REGEX: "regex", StructuredKind.CHOICE: "choice list", StructuredKind.GRAMMAR: "grammar"
            }.get(spec.kind, "JSON schema")
    return f"invalid {what}: {_one_line(error)}"


def _one_line(error: str, limit: int = 400) -> str:
    error = error.split("<state>")[0]  # llguidance appends a dump of parser state and grammar: not for clients
    text = " ".join(line.strip() for line in error.strip().splitlines() if line.strip()) or "rejected"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dead_end(ll: llg.LLMatcher) -> str:
    # llguidance's error text is its reason on the first line, then a dump of parser state and grammar
    reason = (ll.get_error().strip().splitlines() or [""])[0]
    return "no token of the model's vocabulary continues the grammar here" + (f" ({reason})" if reason else "")


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: every token's bytes, EOS, the special tokens, an encoder."""

    ENCODED_KEEP = 1 << 16  # remembered encodings (then forgotten all at once): grammars repeat their literals

    def __init__(self, tok: Tokenizer, token_bytes: TokenBytes, eos_id: int, special: list[int]) -> None:
        self._tok = tok
        self.eos_token_id = eos_id
        self.bos_token_id = None
        self.special_token_ids = special
        self.tokens = [token_bytes(i) for i in range(tok.get_vocab_size())]
        self._encoded: dict[str, list[int]] = {}  # text -> its token ids

    def __call__(self, text: str) -> list[int]:
        # NOTE: llguidance calls this while computing masks, to tokenize the bytes a grammar forces next
        # (an object's "{", a key's closing quote and colon): Tokenizer.encode cost ~20-70 us a call, so
        # at batch 32 it was most of fill_masks' time; the same few strings come back every step.
        if not isinstance(text, str):  # TokenizerWrapper probes with bytes; str is what we take
            raise TypeError("text must be str")
        ids = self._encoded.get(text)
        if ids is None:
            if len(self._encoded) >= self.ENCODED_KEEP:
                self._encoded.clear()
            ids = self._encoded[text] = self._tok.encode(text, add_special_tokens=False).ids
        return ids


class Matcher:
    """One request's position in its grammar. Made by ``GrammarCompiler.compile``; not thread-safe."""

    def __init__(self, ll: llg.LLMatcher, compiler: GrammarCompiler) -> None:
        self._ll = ll
        self._compiler = compiler
        self._dead: str | None = None  # why no token could continue the grammar (EOS was forced)
        self._ended = False  # EOS accepted after a dead end

    def accept(self, token_id: int) -> None:
        """Advance by the sampled token; TokenRejected if the grammar does not allow it here."""
        c = self._compiler
        if self._dead is not None:
            if token_id != c.eos_id:
                raise TokenRejected(f"token {token_id} after a dead end, where only EOS ({c.eos_id}) is allowed")
            self._ended = True
            return
        if not 0 <= token_id < c.n_tokens or not c.allowed[token_id]:
            raise TokenRejected(f"token {token_id} is never allowed under a grammar (special, or not in the "
                                f"tokenizer's {c.n_tokens} tokens)")
        if not self._ll.consume_token(token_id):
            raise TokenRejected(f"token {token_id} does not fit the grammar here: {self._ll.get_error()}")

    def is_terminated(self) -> bool:
        """The grammar is complete and cannot be extended (or EOS was taken): only EOS is allowed now."""
        return self._ended or self._dead is not None or self._ll.is_stopped()

    def is_accepting(self) -> bool:
        """What came so far is a complete match (so EOS is allowed), though it may still be extended."""
        return self._dead is None and self._ll.is_accepting()

    @property
    def error(self) -> str | None:
        """Why the grammar could not be continued (EOS was then the only token left and the output does
        not match the grammar), or None."""
        if self._dead is not None:
            return self._dead
        return _dead_end(self._ll) if self._ll.is_error() else None


class GrammarCompiler:
    """Compiles structured-output specs for one model's vocabulary and fills the batch's masks.

    ``tokenizer_json`` is the text of the model's tokenizer.json; ``vocab_size`` the width of its logits
    (ids from the tokenizer's size up to it are never allowed); ``eos_id`` the token that ends a sequence.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_id: int, config: GrammarConfig | None = None) -> None:
        self.config = config or GrammarConfig()
        tok = Tokenizer.from_str(tokenizer_json)
        self.n_tokens = tok.get_vocab_size()
        if vocab_size < self.n_tokens:
            raise ValueError(f"vocab_size ({vocab_size}) is smaller than the tokenizer's {self.n_tokens} tokens")
        if not 0 <= eos_id < self.n_tokens:
            raise ValueError(f"eos_id must be a token id below {self.n_tokens}, got {eos_id}")
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        added = json.loads(tokenizer_json).get("added_tokens") or []
        special = sorted({int(t["id"]) for t in added if t.get("special")} | {eos_id})
        # (n_tokens,) bool: what a grammar may ever allow; the engine itself only ever offers EOS of these.
        self.allowed = np.ones(self.n_tokens, dtype=bool)
        self.allowed[special] = False
        self.allowed[eos_id] = True
        self._lltok = llg.LLTokenizer(llg.TokenizerWrapper(_Vocabulary(tok, TokenBytes(tok), eos_id, special)))
        self._executor = llg.LLExecutor(num_threads=self.config.threads) if self.config.threads else None
        self._words = (self.n_tokens + 31) // 32  # 32-bit words in one llguidance bitmask row
        padded = np.zeros(self._words * 32, dtype=bool)
        padded[: self.n_tokens] = self.allowed
        self._allowed_words = np.packbits(padded, bitorder="little").view("<u4")  # (words,): allowed as bits
        self._eos_word, self._eos_bit = eos_id >> 5, np.uint32(1 << (eos_id & 31))
        self._bits = np.zeros((1, self._words), dtype="<u4")  # (k, words), grown to the largest batch seen
        self._cache: OrderedDict[str, llg.LLMatcher] = OrderedDict()  # grammar text -> matcher at its start
        self._lock = threading.Lock()

    def compile(self, spec: StructuredSpec) -> Matcher:
        """A fresh matcher for ``spec``; GrammarError (naming ``spec.param``) if it cannot be honoured."""
        text = _grammar_text(spec, self.config)
        with self._lock:
            template = self._cache.get(text)
            if template is not None:
                self._cache.move_to_end(text)
        if template is None:
            template = llg.LLMatcher(self._lltok, text, log_level=0)
            if template.is_error():
                raise GrammarError(_error_message(spec, template.get_error()), spec.param)
            first = np.zeros(self._words, dtype="<u4")
            template.unsafe_compute_mask_ptr(first.ctypes.data, first.nbytes)
            if not (first & self._allowed_words).any():
                raise GrammarError("the model's vocabulary has no token that can start this output", spec.param)
            with self._lock:
                self._cache[text] = template
                while len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
        return Matcher(template.deep_copy(), self)

    def cache_len(self) -> int:
        return len(self._cache)

    def fill_masks(self, matchers: Sequence[Matcher | None], out: np.ndarray) -> np.ndarray:
        """Write each matcher's next-token mask into its row of ``out`` and return those rows' indices.

        ``out`` (B, vocab_size) with B = len(matchers), C-contiguous, either float32 (an additive bias:
        0.0 where a token is allowed, -inf where not; see ``apply_masks``) or bool (True = allowed).
        Rows whose matcher is None are neither computed nor written.
        """
        if out.ndim != 2 or out.shape != (len(matchers), self.vocab_size) or out.dtype not in (np.float32, np.bool_):
            raise ValueError(f"out must be a float32 or bool ({len(matchers)}, {self.vocab_size}) array, "
                             f"got {out.dtype} {out.shape}")
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        idx = [i for i, m in enumerate(matchers) if m is not None]  # plain ints: cheaper than NumPy at small B
        k, n = len(idx), self.n_tokens
        if k == 0:
            return np.empty(0, dtype=np.int64)
        live = [(matchers[r]._ll, j) for j, r in enumerate(idx) if matchers[r]._dead is None]
        if self._bits.shape[0] < k:
            self._bits = np.zeros((k, self._words), dtype="<u4")
        bits = self._bits[:k]  # (k, words)
        bits.fill(0)  # rows of dead-ended matchers stay empty here and get EOS below
        base = bits.ctypes.data  # one ctypes round trip: it costs ~4 us each, per row it was 120 us at batch 32
        if self._executor is not None and live:
            self._executor.unsafe_compute_mask_ptr(live, base, self._words * 4, k)
        else:
            for ll, j in live:
                ll.unsafe_compute_mask_ptr(base + j * self._words * 4, self._words * 4)
        bits &= self._allowed_words  # special tokens (EOS aside) are never text, whatever the engine says
        some = bits.any(axis=1)
        if not some.all():
            for j in np.flatnonzero(~some):  # no token continues the grammar: end the sequence
                m = matchers[idx[j]]
                if m._dead is None:
                    m._dead = _dead_end(m._ll)
                bits[j, self._eos_word] |= self._eos_bit
        ones = np.unpackbits(bits.view(np.uint8), axis=1, count=n, bitorder="little")  # (k, n_tokens) 0 / 1
        contiguous = idx[-1] - idx[0] == k - 1  # the usual batch: write the block in place
        dst = out[idx[0]:idx[0] + k] if contiguous else np.empty((k, self.vocab_size), dtype=out.dtype)
        if out.dtype == np.bool_:
            dst[:, :n] = ones.view(np.bool_)
            dst[:, n:] = False  # the model's padded ids past the tokenizer
        else:
            # 1 -> 0x00000000 (0.0), 0 -> 0xFF800000 (-inf): (x - 1) << 23 in int32, no branch per element
            ints = dst.view(np.int32)
            np.copyto(ints[:, :n], ones, casting="unsafe")
            ints[:, :n] -= 1
            ints[:, :n] <<= 23
            ints[:, n:] = _NEG_INF_BITS
        rows = np.asarray(idx, dtype=np.int64)
        if not contiguous:
            out[rows] = dst
        return rows


def apply_masks(logits: np.ndarray, bias: np.ndarray, rows: np.ndarray) -> None:
    """Add the float32 masks ``fill_masks`` wrote for ``rows`` to ``logits`` (B, V) float32, in place."""
    if bias.dtype != np.float32 or bias.shape != logits.shape:
        raise ValueError(f"bias must be float32 {logits.shape} (fill_masks' additive form), got {bias.dtype} "
                         f"{bias.shape}")
    if rows.size == 0:
        return
    if rows.size == logits.shape[0]:  # every row has a grammar: one add, no temporaries
        np.add(logits, bias, out=logits)
    elif rows[-1] - rows[0] == rows.size - 1:  # a contiguous block of rows: one add on the slice
        s = slice(int(rows[0]), int(rows[-1]) + 1)
        np.add(logits[s], bias[s], out=logits[s])
    else:
        for r in rows:
            np.add(logits[r], bias[r], out=logits[r])
