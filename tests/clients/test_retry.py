"""The retry predicate and the backoff schedule."""

from __future__ import annotations

import httpx
import pytest

from nextoken_client._retry import (
    INITIAL_RETRY_DELAY,
    MAX_RETRY_AFTER,
    MAX_RETRY_DELAY,
    retry_delay,
    should_retry_exception,
    should_retry_status,
)


@pytest.mark.parametrize(("status", "retry"), [
    (400, False), (401, False), (404, False), (422, False), (500, False),
    (408, True), (429, True), (502, True), (503, True), (504, True),
])
def test_status_predicate(status: int, retry: bool) -> None:
    assert should_retry_status(status, {}) is retry


def test_server_header_overrides_and_huge_retry_after_is_not_retried() -> None:
    assert should_retry_status(500, {"x-should-retry": "true"})
    assert not should_retry_status(429, {"x-should-retry": "false"})
    assert not should_retry_status(429, {"retry-after": str(MAX_RETRY_AFTER + 1)})


def test_exception_predicate_only_retries_what_never_reached_the_server() -> None:
    req = httpx.Request("POST", "http://x")
    assert should_retry_exception(httpx.ConnectError("refused", request=req))
    assert should_retry_exception(httpx.ConnectTimeout("slow", request=req))
    assert should_retry_exception(httpx.RemoteProtocolError("Server disconnected without sending a response."))
    assert should_retry_exception(httpx.ReadError("[Errno 104] Connection reset by peer", request=req))
    assert not should_retry_exception(httpx.ReadTimeout("slow", request=req))  # may still be generating
    assert not should_retry_exception(httpx.ReadError("unexpected end of data", request=req))
    assert not should_retry_exception(httpx.RemoteProtocolError("peer closed connection mid-body"))


def test_backoff_doubles_is_capped_and_jittered_down_by_at_most_a_quarter() -> None:
    highs = [retry_delay(n, rng=lambda: 0.0) for n in range(10)]
    lows = [retry_delay(n, rng=lambda: 1.0) for n in range(10)]
    assert highs[:3] == [INITIAL_RETRY_DELAY, 2 * INITIAL_RETRY_DELAY, 4 * INITIAL_RETRY_DELAY]
    assert max(highs) == MAX_RETRY_DELAY
    assert all(lo == pytest.approx(0.75 * hi) for lo, hi in zip(lows, highs, strict=True))


def test_retry_after_wins_over_backoff_and_is_never_shortened() -> None:
    for n in range(5):
        assert 3.0 <= retry_delay(n, {"retry-after": "3"}, rng=lambda: 0.999) <= 3.3
        assert retry_delay(n, {"retry-after": "3"}, rng=lambda: 0.0) == 3.0
    # An absurd value is ignored in favour of our own schedule (and should_retry_status says no).
    assert retry_delay(0, {"retry-after": "3600"}, rng=lambda: 0.0) == INITIAL_RETRY_DELAY
