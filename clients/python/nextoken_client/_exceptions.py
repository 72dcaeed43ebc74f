"""Every error the SDK raises, under one root, and the one function that maps HTTP statuses to them.

Hierarchy::

    NextokenError
    ├── APIStatusError          the server answered with a 4xx/5xx (status_code, message, param, code, body)
    │   ├── ValidationError     other 4xx: 400, 404, 413, 415, 422, ... (bad input; do not retry)
    │   ├── AuthenticationError 401 / 403
    │   ├── OverloadedError     429 (retry_after: seconds the server asked us to wait, if it said)
    │   └── ServerError         5xx (503 while the server drains)
    ├── StreamError             a stream that was cut short after the response started
    └── APIConnectionError      no HTTP answer at all; also a builtin ``ConnectionError``
        └── APITimeoutError     connect or read timed out; also a builtin ``TimeoutError``

The module knows nothing about retries: ``_retry`` decides which of these are worth another try.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "NextokenError",
    "APIStatusError",
    "ValidationError",
    "AuthenticationError",
    "OverloadedError",
    "ServerError",
    "StreamError",
    "APIConnectionError",
    "APITimeoutError",
    "make_status_error",
    "parse_retry_after",
]


class NextokenError(Exception):
    """Root of every exception the SDK raises: ``except NextokenError`` catches them all."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIStatusError(NextokenError):
    """The server answered with an error status; fields come from its ``{"error": {...}}`` body."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.param = param
        self.code = code
        self.type = type
        self.body = body
        self.headers: Mapping[str, str] = headers or {}

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        return f"{self.status_code}: {self.message}{where}"


class ValidationError(APIStatusError):
    """The request was rejected as invalid (a 4xx other than 401/403/429); retrying will not help."""


class AuthenticationError(APIStatusError):
    """The API key was missing or wrong (401), or not allowed (403)."""


class OverloadedError(APIStatusError):
    """429: the server's queue is full. ``retry_after`` is the wait it asked for, in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(APIStatusError):
    """A 5xx: the server failed or (503) is draining before shutdown."""


class StreamError(NextokenError):
    """The stream ended before the server's ``[DONE]`` or final event: the connection dropped,
    the server died, or it sent an error in the middle. ``text`` holds what arrived before the cut,
    ``events`` how many events were delivered; the SDK never retries such a stream, because the
    caller has already seen part of the answer."""

    def __init__(self, message: str, *, text: str = "", events: int = 0) -> None:
        super().__init__(message)
        self.text = text
        self.events = events


class APIConnectionError(NextokenError, ConnectionError):
    """The request got no HTTP answer (refused, reset, DNS...). Subclasses the builtin so generic
    ``except ConnectionError`` handlers still work."""


class APITimeoutError(APIConnectionError, TimeoutError):
    """Connecting, or waiting for the next bytes (the next token, when streaming), took too long."""


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), else None."""
    # The millisecond header is a non-standard but common refinement (openai-python honours it too).
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    from datetime import datetime, timezone
    from email.utils import parsedate_to_datetime  # only dates need it

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive parse means it said so implicitly
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


def _error_fields(body: Any, fallback: str) -> dict[str, Any]:
    """Pull message/param/code/type out of an OpenAI-style body, tolerating anything else."""
    err = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(err, Mapping):
        return {
            "message": str(err.get("message") or fallback),
            "param": err.get("param"),
            "code": None if err.get("code") is None else str(err.get("code")),
            "type": err.get("type"),
        }
    if isinstance(err, str):  # some servers send {"error": "text"}
        return {"message": err, "param": None, "code": None, "type": None}
    if isinstance(body, Mapping) and "detail" in body:  # FastAPI's default error shape
        return {"message": str(body["detail"]), "param": None, "code": None, "type": None}
    if isinstance(body, str) and body.strip():
        return {"message": body.strip()[:500], "param": None, "code": None, "type": None}
    return {"message": fallback, "param": None, "code": None, "type": None}


def make_status_error(status_code: int, body: Any, headers: Mapping[str, str] | None = None) -> APIStatusError:
    """The one place that maps an HTTP error status to an exception class (``body`` is parsed
    JSON when the server sent JSON, else its text)."""
    headers = headers or {}
    fields = _error_fields(body, fallback=f"HTTP {status_code}")
    common: dict[str, Any] = dict(status_code=status_code, body=body, headers=headers, **fields)
    message = common.pop("message")
    if status_code in (401, 403):
        return AuthenticationError(message, **common)
    if status_code == 429:
        return OverloadedError(message, retry_after=parse_retry_after(headers), **common)
    if 400 <= status_code < 500:
        return ValidationError(message, **common)
    if status_code >= 500:
        return ServerError(message, **common)
    # 1xx/3xx reaching here means a redirect we did not follow or a broken proxy: still an error.
    return APIStatusError(message, **common)
