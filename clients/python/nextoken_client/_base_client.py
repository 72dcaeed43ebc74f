"""What ``Client`` and ``AsyncClient`` share: settings, request bodies, and turning responses into
results or exceptions. No I/O happens here, so the two clients differ only in ``await``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import httpx

from ._exceptions import APIConnectionError, APITimeoutError, NextokenError, make_status_error
from ._types import SamplingParams

__all__ = ["DEFAULT_BASE_URL", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_READ_TIMEOUT", "ClientSettings"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_CONNECT_TIMEOUT = 5.0
# The longest silence we accept between bytes: between two tokens of a stream, or, for a
# non-streamed call, the whole generation (the server sends nothing until it is done).
DEFAULT_READ_TIMEOUT = 120.0
API_KEY_ENV = "NEXTOKEN_API_KEY"
BASE_URL_ENV = "NEXTOKEN_BASE_URL"


class ClientSettings:
    """Validated constructor arguments of either client."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        connect_timeout: float,
        read_timeout: float,
        max_retries: int,
        model: str | None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError(f"timeouts must be > 0, got connect={connect_timeout} read={read_timeout}")
        url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        # Accept both "http://host:port" and the OpenAI-style "http://host:port/v1".
        url = url.rstrip("/")
        self.base_url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=connect_timeout,
                                     pool=connect_timeout)
        self.max_retries = max_retries
        self.model = model

    def headers(self) -> dict[str, str]:
        h = {"accept": "application/json", "user-agent": "nextoken-client/0.1"}
        if self.api_key:
            h["authorization"] = f"Bearer {self.api_key}"
        return h


SAMPLING_FIELDS = frozenset(SamplingParams.__annotations__) - {"logprobs", "top_logprobs", "extra_body"}


def request_body(kind: str, payload: Any, stream: bool, default_model: str | None,
                 sampling: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body for a ``"completion"`` (payload: prompt) or ``"chat"`` (payload: messages).

    Sampling fields left as ``None`` mean "server default" and are not sent, so a 0 (greedy
    temperature, seed 0) is always sent as 0. Unknown keywords raise ``TypeError`` like a typo'd
    argument would; ``extra_body`` is the escape hatch for server fields the SDK does not know.
    """
    unknown = set(sampling) - SAMPLING_FIELDS - {"logprobs", "top_logprobs", "extra_body"}
    if unknown:
        raise TypeError(f"unexpected sampling argument(s): {', '.join(sorted(unknown))}")
    body: dict[str, Any] = {k: v for k, v in sampling.items() if k in SAMPLING_FIELDS and v is not None}
    if "model" not in body and default_model is not None:
        body["model"] = default_model
    if isinstance(body.get("stop"), str):
        body["stop"] = [body["stop"]]
    logprobs, top = bool(sampling.get("logprobs")), sampling.get("top_logprobs")
    if kind == "chat":
        body["messages"] = [dict(m) for m in payload]
        if logprobs or top:
            body["logprobs"] = True  # Chat API: a bool, with the count in top_logprobs
            if top:
                body["top_logprobs"] = int(top)
    else:
        body["prompt"] = payload
        if logprobs or top:
            # Completions API: an int, the number of alternatives; the sampled token's logprob always comes.
            body["logprobs"] = int(top or 0)
    body.update(sampling.get("extra_body") or {})
    return _with_stream(body, stream)


def _with_stream(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    if stream:
        body["stream"] = True
        # Ask for usage in a last chunk so the final event can report token counts.
        body.setdefault("stream_options", {"include_usage": True})
    return body


def response_body(response: httpx.Response) -> Any:
    """The parsed JSON body, or its text when it is not JSON (a proxy's HTML error page)."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text


def status_error(response: httpx.Response) -> NextokenError:
    """Call only after the body has been read."""
    return make_status_error(response.status_code, response_body(response), response.headers)


def transport_error(exc: httpx.TransportError, url: str) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request to {url} timed out ({type(exc).__name__}): {exc}")
    return APIConnectionError(f"could not reach {url} ({type(exc).__name__}): {exc}")
