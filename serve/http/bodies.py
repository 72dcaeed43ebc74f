"""Reading a request body: JSON only, a size limit, strict JSON (no NaN or Infinity).

Every POST route with a JSON body reads it here, so each refuses the same way: 415 for another
content type, 413 past ``--max-body-bytes`` (declared or streamed), 400 ``invalid_json``. It knows
nothing about what the body means.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from nextoken.serve.http.errors import RequestError, loads_json


async def read_json(request: Request, limit: int) -> Any:
    return parse_json(await read_body(request, limit))


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, checked for content type and size (not yet parsed).

    A route that answers before it parses still reads the body first: a server that closes a
    connection with unread request bytes makes the kernel reset it, and the client may then see
    "connection reset" instead of the answer.
    """
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise RequestError(f"Content-Type must be application/json, got {ctype or 'none'!r}", status=415,
                           code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"request body of {declared} bytes exceeds the limit of {limit}", status=413,
                           code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise RequestError(f"request body exceeds the limit of {limit} bytes", status=413,
                               code="request_too_large")
    return bytes(body)


def parse_json(body: bytes) -> Any:
    try:
        return loads_json(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON: {e}", code="invalid_json") from None
