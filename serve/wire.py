"""The wire: the pipes between the HTTP process(es) and the engine process, and every message on them.

In: ``AddRequest``, ``CancelRequest``, ``ReloadRequest`` (HTTP -> engine), each in an ``Envelope``
naming the HTTP process that sent it. Out: ``StepOutput`` (one per engine step, every row's new token
at once), ``RequestFailed`` and ``ModelStatus`` (engine -> HTTP), shipped in lists. A value crosses
the boundary once, in one shape: the HTTP side's ``SamplingParams`` is the engine's, token ids stay
ids (the HTTP side detokenizes; the engine never touches text), and a step's tokens travel as arrays,
so the engine does no per-row Python work to report them.

This is the only module both sides of ``serve/`` share besides the configuration, the metric
definitions and the tokenizer's byte table (``config``, ``metrics``, ``tokens``). Everything here is
a plain dataclass or enum of builtins and NumPy arrays: it pickles as is. Rules about what a request
may ask for live in the HTTP side's request contract (``serve/http/requests.py``); here there is only
``SamplingParams.check``, the model-dependent part, which both sides run against the version in
front of them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import select
import struct
from dataclasses import dataclass, field
from enum import Enum
from typing import Union

import numpy as np


class _Text(str, Enum):
    """A string enum that prints and labels as its value (metrics, JSON, logs)."""

    def __str__(self) -> str:
        return self.value


class FinishReason(_Text):
    STOP = "stop"  # end-of-text, a stop token id, or (HTTP side) a stop string
    LENGTH = "length"  # max_tokens, or the end of the context
    CANCELLED = "cancelled"  # the client left, or the HTTP side cancelled it


class ModelEvent(_Text):
    STARTING = "starting"  # (HTTP side only) no word from the engine yet
    LOADED = "loaded"  # the first version is serving
    SWITCHED = "switched"  # a newly published version took over
    FAILED = "failed"  # a new version was refused; ``last_error`` says why, the old one still serves
    FREED = "freed"  # an old version finished its last request and left memory


class StructuredKind(_Text):
    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # a JSON schema
    REGEX = "regex"  # a regular expression the whole output matches
    CHOICE = "choice"  # one of a list of strings
    GRAMMAR = "grammar"  # a Lark or GBNF grammar


@dataclass(frozen=True)
class StructuredSpec:
    """One request's structure, validated by the request contract; the engine compiles it to a grammar.

    ``param`` is the request field it came from, which a refusal (a schema llguidance cannot enforce,
    a grammar the vocabulary cannot start) names in its 400.
    """

    kind: StructuredKind
    param: str
    schema: dict | None = None  # JSON_SCHEMA
    regex: str | None = None  # REGEX
    choices: tuple[str, ...] = ()  # CHOICE
    grammar: str | None = None  # GRAMMAR
    whitespace: str | None = None  # JSON kinds: the whitespace allowed between tokens (None: the engine's)
    whitespace_param: str = "guided_whitespace_pattern"  # the request field ``whitespace`` came from


class ParamError(ValueError):
    """A request the model in front of us cannot take (HTTP 400 naming ``param``)."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass
class SamplingParams:
    """One request's settings, as the request contract made them (it alone checks their ranges).

    Values are already normalised: temperature 0 is greedy (top-k, top-p and min-p off), top_k 0 is
    off. ``check`` is the model-dependent part of validation (vLLM's ``verify(model_config)``).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # tokens to generate; None = the rest of the context; 0 = only with prompt_logprobs (score the prompt)
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings: the HTTP side's text stream handles them
    include_stop: list[str] = field(default_factory=list)  # (HTTP side) stop strings kept in the output text
    skip_special_tokens: bool = True  # (HTTP side) special tokens add no text
    spaces_between_special_tokens: bool = True  # (HTTP side) shown special tokens are set apart by spaces
    stop_token_ids: list[int] = field(default_factory=list)  # token ids that end the sequence (besides EOS)
    seed: int | None = None
    logprobs: int | None = None  # None = none; N = the chosen token's plus the top N alternatives
    prompt_logprobs: int | None = None  # None = none; N = each prompt token's plus the top N alternatives
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    ignore_eos: bool = False
    structured: StructuredSpec | None = None
    speculative: bool = True  # False: this request never drafts, whatever the server's --speculative

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_counts(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def check(self, prompt_ids: list[int], *, vocab_size: int, context: int, where: str = "",
              prompt_param: str = "prompt") -> int:
        """The checks that depend on the model: token ids in its vocabulary, prompt + output in its context.

        Returns the tokens to generate (``max_tokens``, or what the context leaves). ``where`` names the
        prompt among several in messages (" (prompt 2)"); ``prompt_param`` is the request field that
        holds it (``messages`` for a chat). Raises ``ParamError``.
        """
        for name, ids in (("logit_bias", list(self.logit_bias)), ("stop_token_ids", self.stop_token_ids)):
            bad = [i for i in ids if i >= vocab_size]
            if bad:
                raise ParamError(f"{name} token ids must be < the vocabulary size {vocab_size}, got {bad[0]}", name)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and v > vocab_size:
                raise ParamError(f"{name} must be <= the vocabulary size {vocab_size}, got {v}", name)
        bad = next((t for t in prompt_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ParamError(f"prompt token ids must be in [0, {vocab_size}), got {bad}", prompt_param)
        n = len(prompt_ids)
        if n == 0:
            raise ParamError("the prompt is empty after tokenization", prompt_param)
        room = 0 if self.max_tokens == 0 else 1  # room for one token, unless the prompt is only scored
        if n + room > context:
            raise ParamError(f"the prompt{where} is {n} tokens long; this model's context is {context} tokens",
                             prompt_param, "context_length_exceeded")
        max_tokens = context - n if self.max_tokens is None else self.max_tokens
        if n + max_tokens > context:
            raise ParamError(f"prompt{where} ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds "
                             f"this model's context of {context} tokens", "max_tokens", "context_length_exceeded")
        if self.min_tokens > max_tokens:
            raise ParamError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens")
        return max_tokens


# --- HTTP -> engine ------------------------------------------------------------------------------
@dataclass
class AddRequest:
    rid: str
    prompt_ids: list[int]  # exactly what the model is fed
    params: SamplingParams
    arrival: float  # wall-clock time the HTTP side received it (time.time())
    model: str  # the version whose tokenizer made prompt_ids
    prompt_text: str | None = None  # to tokenize again if another version runs it (hot reload)
    add_special_tokens: bool = True  # how prompt_ids were made from prompt_text (ModelTokenizer.encode_prompt)


@dataclass
class CancelRequest:
    rid: str  # the client left, or the HTTP side saw a stop string: drop it between steps


@dataclass
class ReloadRequest:
    """Look for a new model version now (the engine also looks about once a second)."""


@dataclass
class Shutdown:
    """The request pipe is closed: the server is stopping (put by the engine's own reader, never sent)."""


ToEngine = Union[AddRequest, CancelRequest, ReloadRequest, Shutdown]  # noqa: UP007 (a runtime alias)


@dataclass(frozen=True)
class Envelope:
    """One message to the engine and the HTTP process whose pipe its answers go back on."""

    frontend: int
    message: ToEngine


# --- engine -> HTTP ------------------------------------------------------------------------------
@dataclass
class Started:
    """Facts about a request known when its first output is ready."""

    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    queue_time: float  # seconds from arrival to getting a cache slot
    model: str  # the version running it
    written_tokens: int = 0  # prompt tokens whose KV it wrote into the prefix cache (blocks not held before)
    # prompt logprobs, when asked: per prompt position 1..T-1, the logprob of that prompt token, and
    # the top N alternatives (ids (T-1, N), logprobs (T-1, N)); position 0 has none
    prompt_logprobs: np.ndarray | None = None  # (T-1,) float32
    prompt_top_ids: np.ndarray | None = None  # (T-1, N) int64
    prompt_top_logprobs: np.ndarray | None = None  # (T-1, N) float32


@dataclass
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    stop_token: int | None = None  # the token id that ended it, for STOP


@dataclass
class StepOutput:
    """Everything one engine step produced, for every request at once.

    A request has one row per token it produced this step: one, or with speculative decoding up to
    the draft's length + 1, in the order they were generated.
    """

    time: float  # wall-clock time the tokens were sampled (time.time())
    rids: list[str] = field(default_factory=list)  # rows that produced a token, in order
    token_ids: np.ndarray | None = None  # (n,) int64
    logprobs: np.ndarray | None = None  # (n,) float32, NaN in rows that did not ask
    top_ids: list[np.ndarray | None] | None = None  # per row: (N,) or None
    top_logprobs: list[np.ndarray | None] | None = None
    started: dict[str, Started] = field(default_factory=dict)  # rid -> facts, on its first output
    finished: dict[str, Finished] = field(default_factory=dict)  # rid -> how it ended (after its last token)
    # (n,) bool: rows whose token was a draft token the model accepted (speculative decoding); None: none was
    drafted: np.ndarray | None = None

    def mark_drafted(self, first: int, mask: np.ndarray) -> None:
        """Rows first, first + 1, ... (as many as ``mask`` (m,)) hold accepted draft tokens where ``mask``."""
        if self.drafted is None:
            self.drafted = np.zeros(len(self.rids), dtype=bool)
        self.drafted[first:first + mask.size] |= mask

    def add_rows(self, rids: list[str], token_ids: np.ndarray, logprobs: np.ndarray | None,
                 top_ids: list[np.ndarray | None], top_logprobs: list[np.ndarray | None]) -> None:
        """Append rows (a sampler's result); the first call takes the arrays as they are, later ones concatenate."""
        if not self.rids:
            self.rids, self.token_ids = rids, token_ids
            if logprobs is not None:
                self.logprobs, self.top_ids, self.top_logprobs = logprobs, top_ids, top_logprobs
            return
        n0, n = len(self.rids), len(rids)
        self.rids = self.rids + rids
        self.token_ids = np.concatenate([self.token_ids, token_ids])
        if self.drafted is not None:
            self.drafted = np.concatenate([self.drafted, np.zeros(n, dtype=bool)])
        if logprobs is None and self.logprobs is None:
            return
        nan0, nan1 = np.full(n0, np.nan, dtype=np.float32), np.full(n, np.nan, dtype=np.float32)
        self.logprobs = np.concatenate([nan0 if self.logprobs is None else self.logprobs,
                                        nan1 if logprobs is None else logprobs])
        self.top_ids = (self.top_ids or [None] * n0) + (top_ids if logprobs is not None else [None] * n)
        self.top_logprobs = (self.top_logprobs or [None] * n0) + (top_logprobs if logprobs is not None else [None] * n)


@dataclass
class RequestFailed:
    rid: str
    status: int  # HTTP status to answer (400 for a request the version running it cannot take, 500 for ours)
    message: str
    param: str | None = None
    code: str = "internal_error"


@dataclass
class ModelStatus:
    """Which version takes new requests (sent on start-up, on every switch, and on a refused version)."""

    id: str
    name: str
    version: str
    path: str
    context: int  # the model's context
    max_model_len: int  # the longest sequence this server caches (<= context)
    vocab_size: int
    provider: str
    models_loaded: int
    event: ModelEvent = ModelEvent.LOADED
    last_error: str | None = None  # with FAILED: why the new version was refused


FromEngine = Union[StepOutput, RequestFailed, ModelStatus]  # noqa: UP007 (a runtime alias)


class Pipes:
    """Direct queues between the HTTP process(es) and the engine process, made before either starts.

    ``requests``: ``Envelope``s in. ``responses[i]``: lists of ``FromEngine`` messages out to HTTP
    process ``i``. Plain pipes (~1 us a put), not manager proxies: the engine process, spawned,
    receives them pickled; the HTTP process, forked, inherits them.
    """

    def __init__(self, num_frontends: int = 1) -> None:
        ctx = mp.get_context("spawn")  # a fork-context lock may not be shared with a spawned process
        self.requests = ctx.SimpleQueue()
        self.responses = [ResponsePipe(ctx) for _ in range(num_frontends)]


class ResponsePipe:
    """The engine's messages to one HTTP process, framed (an 8-byte length, then the pickle).

    One writer, the engine's sender thread, which may block on a full pipe. One reader, that process's
    event loop: it watches ``fileno()`` and takes whatever bytes are there (``read_ready``), so a batch
    still being written never blocks it, and no reader thread wakes and hands over once per step.
    """

    HEADER = struct.Struct("<Q")

    def __init__(self, ctx: mp.context.BaseContext) -> None:
        self._reader, self._writer = ctx.Pipe(duplex=False)  # Connections: they travel to a spawned process
        self._buf = bytearray()  # bytes read that do not make a whole batch yet
        self._pending: list[list[FromEngine]] = []  # whole batches read but not yet taken by get()

    def put(self, batch: list[FromEngine]) -> None:
        data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(self.HEADER.pack(len(data)) + data)
        fd = self._writer.fileno()
        while view:
            view = view[os.write(fd, view):]

    def fileno(self) -> int:
        return self._reader.fileno()

    def read_ready(self) -> list[list[FromEngine]]:
        """Every whole batch the bytes there now complete (maybe none); EOFError once the writer is gone."""
        try:
            chunk = os.read(self.fileno(), 1 << 20)
        except BlockingIOError:
            return []
        if not chunk:
            raise EOFError("the engine closed its end of the pipe")
        self._buf += chunk
        out, at, n = [], 0, len(self._buf)
        while n - at >= self.HEADER.size:
            size = self.HEADER.unpack_from(self._buf, at)[0]
            if n - at - self.HEADER.size < size:
                break
            at += self.HEADER.size
            out.append(pickle.loads(self._buf[at:at + size]))
            at += size
        del self._buf[:at]
        return out

    def get(self, timeout: float | None = None) -> list[FromEngine]:
        """The next batch, waiting up to ``timeout`` seconds (None: for ever): for a reader off the loop."""
        pending = self._pending
        while not pending:
            if not select.select([self.fileno()], [], [], timeout)[0]:
                raise TimeoutError("no batch from the engine")
            pending = self.read_ready()
        self._pending = pending[1:]
        return pending[0]
