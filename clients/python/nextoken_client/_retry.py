"""When to retry a request and how long to wait first. Pure functions; the clients do the sleeping.

The module ignores streams: a stream is only ever retried before its response starts, which the
clients enforce by retrying the request that opens it and nothing after.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import httpx

from ._exceptions import parse_retry_after

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "INITIAL_RETRY_DELAY",
    "MAX_RETRY_DELAY",
    "RETRYABLE_STATUSES",
    "should_retry_status",
    "should_retry_exception",
    "retry_delay",
]

DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY = 0.5  # seconds before the first retry, doubled each time after
MAX_RETRY_DELAY = 8.0  # cap on our own backoff
MAX_RETRY_AFTER = 60.0  # a server asking for longer than this gets an error, not a minute-long hang

# 408 request timeout, 429 overloaded, 502/503/504 a proxy or a draining server. Not 500: an
# internal error on a generation usually repeats, and re-running it doubles the server's work.
RETRYABLE_STATUSES = frozenset({408, 429, 502, 503, 504})


def should_retry_status(status_code: int, headers: Mapping[str, str]) -> bool:
    """Whether an error response is worth another attempt (before any token was delivered)."""
    # A server may override our rule either way, as OpenAI's does with this header.
    override = headers.get("x-should-retry")
    if override == "true":
        return True
    if override == "false":
        return False
    if status_code not in RETRYABLE_STATUSES:
        return False
    retry_after = parse_retry_after(headers)
    return retry_after is None or retry_after <= MAX_RETRY_AFTER


def should_retry_exception(exc: BaseException) -> bool:
    """Whether a transport failure is safe to retry: only those where the server cannot have
    started the generation (it never got the request). A read timeout is not: the server may
    still be generating, and a retry would double its load."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return True
    # "Server disconnected without sending a response": a kept-alive socket the server had closed.
    if isinstance(exc, httpx.RemoteProtocolError) and "without sending" in str(exc):
        return True
    # The same socket reset instead of closed (a proxy reloading drops its idle kept-alive connections
    # with an RST): the clients retry only before any response byte, so nothing was answered on it.
    return isinstance(exc, httpx.ReadError) and "Connection reset" in str(exc)


def retry_delay(
    attempt: int,
    headers: Mapping[str, str] | None = None,
    *,
    initial: float = INITIAL_RETRY_DELAY,
    maximum: float = MAX_RETRY_DELAY,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to sleep before retry number ``attempt`` (0 for the first retry).

    A server-given ``Retry-After`` wins: we wait at least that, plus up to 10% so that a crowd of
    clients told the same number does not return in one burst. Otherwise exponential backoff
    ``initial * 2**attempt`` capped at ``maximum``, scaled by a jitter in (0.75, 1].
    """
    retry_after = parse_retry_after(headers or {})
    if retry_after is not None and retry_after <= MAX_RETRY_AFTER:
        return retry_after * (1.0 + 0.1 * rng())
    backoff = min(initial * (2.0**attempt), maximum)
    return backoff * (1.0 - 0.25 * rng())
