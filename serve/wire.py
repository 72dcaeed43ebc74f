"""The wire: typed messages between the HTTP side (frontend) and the engine process.

In: ``AddRequest``, ``CancelRequest``, ``ReloadRequest`` (frontend -> engine, one pipe).
Out: ``StepOutput`` (one per engine step, every row's new token at once), ``RequestFailed`` and
``ModelStatus`` (engine -> frontend). A value crosses the boundary once, in one shape: the
frontend's ``SamplingParams`` is the engine's, token ids stay ids (the frontend detokenizes; the
engine never touches text), and a step's tokens travel as arrays, so the engine does no per-row
Python work to report them.

Everything here is a plain dataclass of builtins and NumPy arrays: it pickles as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nextoken.serve.engine.sampler import SamplingParams


# --- frontend -> engine ---------------------------------------------------------------------------
@dataclass
class AddRequest:
    rid: str
    prompt_ids: list[int]  # exactly what the model is fed
    params: SamplingParams
    arrival: float  # wall-clock time the HTTP side received it (time.time())
    model: str  # the version whose tokenizer made prompt_ids
    prompt_text: str | None = None  # to tokenize again if another version runs it (hot reload)
    add_eos_prefix: bool = True  # how prompt_ids were made from prompt_text (a document starts after EOS)


@dataclass
class CancelRequest:
    rid: str  # the client left, or the frontend saw a stop string: drop it between steps


@dataclass
class ReloadRequest:
    """Look for a new model version now (the engine also looks about once a second)."""


# --- engine -> frontend ---------------------------------------------------------------------------
@dataclass
class Started:
    """Facts about a request known when its first output is ready."""

    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    queue_time: float  # seconds from arrival to getting a cache slot
    model: str  # the version running it
    # prompt logprobs, when asked: per prompt position 1..T-1, the logprob of that prompt token, and
    # the top N alternatives (ids (T-1, N), logprobs (T-1, N)); position 0 has none
    prompt_logprobs: np.ndarray | None = None  # (T-1,) float32
    prompt_top_ids: np.ndarray | None = None  # (T-1, N) int64
    prompt_top_logprobs: np.ndarray | None = None  # (T-1, N) float32


@dataclass
class Finished:
    reason: str  # "stop" (end-of-text or a stop token) | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    stop_token: int | None = None  # the token id that ended it, for "stop"


@dataclass
class StepOutput:
    """Everything one engine step produced, for every request at once."""

    time: float  # wall-clock time the tokens were sampled (time.time())
    rids: list[str] = field(default_factory=list)  # rows that produced a token, in order
    token_ids: np.ndarray | None = None  # (n,) int64
    logprobs: np.ndarray | None = None  # (n,) float32, NaN in rows that did not ask
    top_ids: list[np.ndarray | None] | None = None  # per row: (N,) or None
    top_logprobs: list[np.ndarray | None] | None = None
    started: dict[str, Started] = field(default_factory=dict)  # rid -> facts, on its first output
    finished: dict[str, Finished] = field(default_factory=dict)  # rid -> how it ended (after its last token)


@dataclass
class RequestFailed:
    rid: str
    status: int  # HTTP status to answer (400 for a request the version running it cannot take, 500 for ours)
    message: str
    param: str | None = None
    code: str = "internal_error"

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


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
    eos_id: int
    provider: str
    models_loaded: int
    event: str = "loaded"  # "loaded" | "switched" | "failed" (then last_error says why)
    last_error: str | None = None
