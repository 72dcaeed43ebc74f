"""The status → exception mapping and the hierarchy's promises."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from nextoken_client import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    NextokenError,
    OverloadedError,
    ServerError,
    StreamError,
    ValidationError,
)
from nextoken_client._exceptions import make_status_error, parse_retry_after

BODY = {"error": {"message": "top_p must be in (0, 1], got 2", "type": "invalid_request_error",
                  "param": "top_p", "code": "invalid_value"}}


@pytest.mark.parametrize(("status", "cls"), [
    (400, ValidationError), (404, ValidationError), (413, ValidationError), (415, ValidationError),
    (422, ValidationError), (401, AuthenticationError), (403, AuthenticationError), (429, OverloadedError),
    (500, ServerError), (503, ServerError), (504, ServerError),
])
def test_status_maps_to_class_and_keeps_fields(status: int, cls: type[APIStatusError]) -> None:
    err = make_status_error(status, BODY, {})
    assert type(err) is cls and isinstance(err, APIStatusError) and isinstance(err, NextokenError)
    assert (err.status_code, err.message, err.param, err.code) == (status, BODY["error"]["message"], "top_p",
                                                                  "invalid_value")
    assert err.body == BODY and "top_p" in str(err)


def test_overloaded_carries_retry_after() -> None:
    err = make_status_error(429, BODY, {"retry-after": "2"})
    assert isinstance(err, OverloadedError) and err.retry_after == 2.0


@pytest.mark.parametrize(("body", "message"), [
    ("<html>bad gateway</html>", "<html>bad gateway</html>"),
    ({"detail": "Not Found"}, "Not Found"),
    ({"error": "plain"}, "plain"),
    (None, "HTTP 502"),
    ({"error": {"code": 7}}, "HTTP 502"),
])
def test_non_openai_bodies_still_give_a_message(body: object, message: str) -> None:
    assert make_status_error(502, body, {}).message == message


def test_builtin_bases_let_generic_handlers_catch() -> None:
    assert issubclass(APIConnectionError, ConnectionError)
    assert issubclass(APITimeoutError, TimeoutError) and issubclass(APITimeoutError, APIConnectionError)
    for cls in (StreamError, APIConnectionError, APIStatusError):
        assert issubclass(cls, NextokenError)
    assert not issubclass(StreamError, APIConnectionError)  # a cut stream is not retryable


@pytest.mark.parametrize(("headers", "expected"), [
    ({}, None), ({"retry-after": "3"}, 3.0), ({"retry-after": "0.5"}, 0.5), ({"retry-after-ms": "250"}, 0.25),
    ({"retry-after": "-4"}, 0.0), ({"retry-after": "soon"}, None),
])
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date() -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    got = parse_retry_after({"retry-after": format_datetime(when, usegmt=True)})
    assert got is not None and 28 <= got <= 30
