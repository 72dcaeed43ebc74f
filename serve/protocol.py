"""OpenAI-compatible request validation and response shapes (completions and chat).

Validation happens once, at the boundary, and every error names the field and the bad value
(``temperature must be in [0, 2], got 3``), so clients get a 400 with an OpenAI-style body
instead of a 500 from deep inside. Unknown fields are ignored, as vLLM does; known fields
with the wrong type or range are refused.

Chat template (documented in the README): every message becomes ``"{Role}: {content}\\n"``
(System, User, Assistant) and the prompt ends with ``"Assistant:"``; generation also stops
at ``"\\nUser:"`` so the model does not write the user's next turn.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from nextoken.serve.sampling import SamplingParams

MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"


class RequestError(Exception):
    """A client error, answered with ``{"error": {message, type, param, code}}``."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value", status: int = 400,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    endpoint: str  # "completions" | "chat"
    prompt: str | None
    prompt_ids: list[int] | None  # a completions prompt given as token ids
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    logprobs: bool = False
    extra_stop: list[str] = field(default_factory=list)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v):
        raise RequestError(f"{name} must be a number, got {json.dumps(v)}", param=name, code="invalid_type")
    if isinstance(v, float) and not math.isfinite(v):  # NaN passes every range check; 1e400 parses as inf
        raise RequestError(f"{name} must be a finite number, got {v}", param=name)
    if (v <= lo if lo_open else v < lo) or v > hi:
        interval = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise RequestError(f"{name} must be in {interval}, got {v}", param=name)
    return float(v)


def _int(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise RequestError(f"{name} must be an integer, got {json.dumps(v)}", param=name, code="invalid_type")
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise RequestError(f"{name} must be {bound}, got {v}", param=name)
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"{name} must be a boolean, got {json.dumps(v)}", param=name, code="invalid_type")
    return v


def _text(v: str, param: str) -> str:
    """A JSON string that is valid Unicode: a lone surrogate (``"\\ud800"``) parses, but no tokenizer takes it."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{param} is not valid Unicode: {e.reason} at character {e.start}", param=param) from None
    return v


def loads_json(data: bytes | bytearray) -> Any:
    """Strict JSON: ``NaN`` and ``Infinity`` (which Python's parser accepts) are refused."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(data, parse_constant=refuse)


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings", param="stop", code="invalid_type")
    if len(stops) > MAX_STOP:
        raise RequestError(f"stop may hold at most {MAX_STOP} strings, got {len(stops)}", param="stop")
    if any(s == "" for s in stops):
        raise RequestError("stop strings must not be empty", param="stop")
    return [_text(s, "stop") for s in stops]


def chat_prompt(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages",
                           code="invalid_type" if not isinstance(messages, list) else "invalid_value")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object", param=f"messages[{i}]", code="invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {json.dumps(role)}",
                               param=f"messages[{i}].role")
        if isinstance(content, list):  # OpenAI's content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"messages[{i}].content parts must be text parts", param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string", param=f"messages[{i}].content",
                               code="invalid_type")
        parts.append(f"{CHAT_ROLES[role]}: {_text(content, f'messages[{i}].content')}\n")
    return "".join(parts) + "Assistant:"


def parse_request(body: Any, endpoint: str, *, default_max_tokens: int | None) -> GenerationRequest:
    """Validate a decoded JSON body into a GenerationRequest (context checks come later)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model must be a string", param="model", code="invalid_type")
    n = _int(body, "n", 1, 1)
    if n != 1:
        raise RequestError(f"n must be 1 (one choice per request), got {n}", param="n")
    if _bool(body, "echo", False):
        raise RequestError("echo is not supported", param="echo")
    for name in ("best_of", "suffix"):
        if body.get(name) not in (None, 1, ""):
            raise RequestError(f"{name} is not supported", param=name)

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    extra_stop: list[str] = []
    if endpoint == "chat":
        prompt = chat_prompt(body.get("messages"))
        extra_stop = [CHAT_STOP]
        max_tokens = _int(body, "max_completion_tokens", None, 1)
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens", default_max_tokens, 1)
        want_lp = _bool(body, "logprobs", False)
        top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not want_lp:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (top or 0) if want_lp else None
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            if p == "":
                raise RequestError("prompt must not be empty", param="prompt")
            prompt = _text(p, "prompt")
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            prompt_ids = list(p)
        elif p is None:
            raise RequestError("prompt is required", param="prompt", code="missing_required_parameter")
        else:
            raise RequestError("prompt must be a string, a list with one string, or a list of token ids",
                               param="prompt", code="invalid_type")
        # OpenAI's completions default is 16 tokens; None = the rest of the context
        max_tokens = _int(body, "max_tokens", 16 if default_max_tokens is None else default_max_tokens, 1)
        logprobs = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)

    top_k = _int(body, "top_k", 0, -1)
    stream = _bool(body, "stream", False)
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise RequestError("stream_options must be an object", param="stream_options", code="invalid_type")
        if not stream:
            raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
        include_usage = _bool(opts, "include_usage", False)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(f"seed must be an integer, got {json.dumps(seed)}", param="seed", code="invalid_type")
    params = SamplingParams(
        temperature=_num(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=max(top_k, 0),
        repetition_penalty=_num(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
        presence_penalty=_num(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_num(body, "frequency_penalty", 0.0, -2.0, 2.0),
        max_tokens=max_tokens if max_tokens is not None else 0,  # 0 = fill the context (resolved later)
        stop=_stop(body) + extra_stop,
        seed=seed,
        logprobs=logprobs,
        ignore_eos=_bool(body, "ignore_eos", False),
    )
    return GenerationRequest(endpoint, prompt, prompt_ids, params, stream, include_usage, model,
                             logprobs is not None, extra_stop)


# --- responses ---------------------------------------------------------------------------------
def new_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(items: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    for it in items:
        tokens.append(it["token"])
        lps.append(it["logprob"])
        tops.append({t[0]: t[2] for t in it["top"]} if it["top"] else None)
        offsets.append(offset)
        offset += len(it["token"])
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's chat shape; ``bytes`` are the token's own bytes (part of a character for byte-level BPE)."""

    def entry(token: str, lp: float, raw: list[int] | None) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": raw if raw is not None else list(token.encode("utf-8"))}

    return {"content": [dict(entry(it["token"], it["logprob"], it.get("bytes")),
                             top_logprobs=[entry(t[0], t[2], t[3] if len(t) > 3 else None) for t in it["top"]])
                        for it in items]}


class ResponseBuilder:
    """Chunks and final bodies for one response; every chunk shares one id."""

    def __init__(self, endpoint: str, model: str) -> None:
        self.endpoint = endpoint
        self.model = model
        self.id = new_id(endpoint)
        self.created = int(time.time())
        self.text_offset = 0

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str, token_ids: list[int], logprobs: list[dict[str, Any]] | None,
              finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        if self.endpoint == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else (
                {"content": text} if text or finish_reason is None else {})
            choice: dict[str, Any] = {"index": 0, "delta": delta,
                                      "logprobs": chat_logprobs(logprobs) if logprobs else None,
                                      "finish_reason": finish_reason, "token_ids": token_ids}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        lp = completion_logprobs(logprobs, self.text_offset) if logprobs else None
        self.text_offset += len(text)
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason, "token_ids": token_ids}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def final(self, text: str, token_ids: list[int], logprobs: list[dict[str, Any]] | None, finish_reason: str,
              prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        if self.endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": chat_logprobs(logprobs) if logprobs is not None else None,
                      "finish_reason": finish_reason, "token_ids": token_ids}
            return {**self._head("chat.completion"), "choices": [choice],
                    "usage": usage(prompt_tokens, completion_tokens)}
        choice = {"index": 0, "text": text,
                  "logprobs": completion_logprobs(logprobs, 0) if logprobs is not None else None,
                  "finish_reason": finish_reason, "token_ids": token_ids}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
