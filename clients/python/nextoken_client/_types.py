"""Result and event types, and the parsers that build them from OpenAI-shaped JSON.

Parsers are tolerant: missing or extra fields never raise, because the server and the SDK are
versioned separately. Both the completions shape (``text``, ``logprobs.tokens``/``token_logprobs``/
``top_logprobs``) and the chat shape (``message``/``delta.content``, ``logprobs.content[]``) are read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

__all__ = [
    "SamplingParams",
    "ChatMessage",
    "Usage",
    "TopLogprob",
    "TokenLogprob",
    "Completion",
    "StreamEvent",
    "Model",
    "parse_usage",
    "parse_logprobs",
    "parse_completion",
]


class SamplingParams(TypedDict, total=False):
    """Keyword arguments every generation method accepts; leave one out for the server default."""

    model: str
    max_tokens: int
    temperature: float  # 0 means greedy
    top_p: float
    top_k: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    stop: str | Sequence[str]
    seed: int
    logprobs: bool  # return the sampled token's log-probability
    top_logprobs: int  # and this many alternatives per position (implies logprobs)
    extra_body: Mapping[str, Any]  # merged into the JSON body last: server fields the SDK lacks


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the top alternatives the server reported."""

    token: str
    logprob: float | None
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Completion:
    """A finished (non-streamed) completion or chat reply; ``text`` is the message content for chat."""

    id: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage | None
    logprobs: tuple[TokenLogprob, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class StreamEvent:
    """One piece of a stream, as it arrived.

    Every event but the last carries text (and ``token_ids`` / ``logprobs`` when the server sent
    them). The last event has ``final=True``, empty text, and the ``finish_reason`` and ``usage``
    (usage when the server reported it; the SDK asks for it by default).
    """

    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    final: bool = False
    id: str = ""


@dataclass(frozen=True)
class Model:
    id: str
    owned_by: str = ""
    created: int = 0
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_usage(data: Any) -> Usage | None:
    if not isinstance(data, Mapping):
        return None
    prompt, completion = _int(data.get("prompt_tokens")), _int(data.get("completion_tokens"))
    total = _int(data.get("total_tokens")) or prompt + completion
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)


def _top_from_mapping(top: Any) -> tuple[TopLogprob, ...]:
    # completions shape: {token: logprob, ...}; chat shape: [{"token", "logprob"}, ...]
    if isinstance(top, Mapping):
        return tuple(TopLogprob(str(t), lp) for t, v in top.items() if (lp := _float(v)) is not None)
    if isinstance(top, Sequence) and not isinstance(top, str):
        return tuple(
            TopLogprob(str(e.get("token", "")), lp)
            for e in top
            if isinstance(e, Mapping) and (lp := _float(e.get("logprob"))) is not None
        )
    return ()


def parse_logprobs(data: Any) -> tuple[TokenLogprob, ...]:
    """Normalise either OpenAI logprobs shape into one tuple of ``TokenLogprob``."""
    if not isinstance(data, Mapping):
        return ()
    content = data.get("content")
    if isinstance(content, Sequence) and not isinstance(content, str):  # chat shape
        return tuple(
            TokenLogprob(
                token=str(e.get("token", "")),
                logprob=_float(e.get("logprob")),
                top=_top_from_mapping(e.get("top_logprobs")),
            )
            for e in content
            if isinstance(e, Mapping)
        )
    tokens, values, tops = (_list(data.get(k)) for k in ("tokens", "token_logprobs", "top_logprobs"))
    out = []
    for i, tok in enumerate(tokens):
        lp = values[i] if i < len(values) else None
        out.append(TokenLogprob(
            token=str(tok),
            logprob=_float(lp),
            top=_top_from_mapping(tops[i]) if i < len(tops) else (),
        ))
    return tuple(out)


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


def choice_text(choice: Mapping[str, Any]) -> str:
    """Text of a completions choice, a chat message, or a chat delta, whichever is present."""
    if isinstance(choice.get("text"), str):
        return choice["text"]
    for key in ("delta", "message"):
        part = choice.get(key)
        if isinstance(part, Mapping) and isinstance(part.get("content"), str):
            return part["content"]
    return ""


def choice_token_ids(choice: Mapping[str, Any]) -> tuple[int, ...]:
    ids = choice.get("token_ids")
    if isinstance(ids, Sequence) and not isinstance(ids, str):
        return tuple(int(i) for i in ids if isinstance(i, int))
    return ()


def parse_completion(data: Any) -> Completion:
    """Build a ``Completion`` from a /v1/completions or /v1/chat/completions response body."""
    body: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    choices = body.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    choice: Mapping[str, Any] = first if isinstance(first, Mapping) else {}
    logprobs = choice.get("logprobs")
    ids = choice_token_ids(choice)
    return Completion(
        id=str(body.get("id", "")),
        model=str(body.get("model", "")),
        text=choice_text(choice),
        finish_reason=None if choice.get("finish_reason") is None else str(choice["finish_reason"]),
        usage=parse_usage(body.get("usage")),
        logprobs=parse_logprobs(logprobs) if logprobs is not None else None,
        token_ids=ids or None,
        raw=body,
    )


def parse_model(data: Any) -> Model:
    m: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    return Model(id=str(m.get("id", "")), owned_by=str(m.get("owned_by", "")), created=_int(m.get("created")),
                 raw=m)
