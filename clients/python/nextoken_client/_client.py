"""The synchronous ``Client``.

Every request goes through ``_send``, the only place that retries: connection failures where the
server never got the request, and 408/429/502/503/504 (honouring ``Retry-After``). A stream is
retried only while opening it; once its 200 arrived, failures surface as ``StreamError``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from ._base_client import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    ClientSettings,
    request_body,
    response_body,
    status_error,
    transport_error,
)
from ._exceptions import NextokenError
from ._retry import DEFAULT_MAX_RETRIES, retry_delay, should_retry_exception, should_retry_status
from ._streaming import Stream
from ._types import ChatMessage, Completion, Model, parse_completion, parse_model

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._types import SamplingParams

__all__ = ["Client"]


class Client:
    """A connection pool to one nextoken (or any OpenAI-compatible) server.

    >>> with Client("http://127.0.0.1:8000") as client:
    ...     print(client.complete("Once upon a time", max_tokens=20).text)

    ``api_key`` defaults to ``$NEXTOKEN_API_KEY``, ``base_url`` to ``$NEXTOKEN_BASE_URL``.
    ``read_timeout`` is the longest silence accepted between two tokens of a stream, and for a
    non-streamed call the whole generation. Pass ``http_client`` to control pooling or transport
    yourself; the client then leaves closing it to you.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        model: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._settings = ClientSettings(base_url, api_key, connect_timeout, read_timeout, max_retries, model)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(timeout=self._settings.timeout)

    @property
    def base_url(self) -> str:
        return self._settings.base_url

    # -- generation -------------------------------------------------------------------------------

    def complete(self, prompt: str, **sampling: Unpack[SamplingParams]) -> Completion:
        """Generate a completion of ``prompt`` and return it once finished."""
        body = request_body("completion", prompt, False, self._settings.model, sampling)
        return parse_completion(self._post_json("/v1/completions", body))

    def stream(self, prompt: str, **sampling: Unpack[SamplingParams]) -> Stream:
        """Generate a completion of ``prompt`` and iterate over it as it is produced::

            with client.stream("Hello", max_tokens=16) as events:
                for event in events:
                    print(event.text, end="")
        """
        body = request_body("completion", prompt, True, self._settings.model, sampling)
        return Stream(self._send("POST", "/v1/completions", body, stream=True))

    def chat(self, messages: Sequence[ChatMessage], **sampling: Unpack[SamplingParams]) -> Completion:
        """One assistant reply to ``messages``; ``Completion.text`` is its content."""
        body = request_body("chat", messages, False, self._settings.model, sampling)
        return parse_completion(self._post_json("/v1/chat/completions", body))

    def chat_stream(self, messages: Sequence[ChatMessage], **sampling: Unpack[SamplingParams]) -> Stream:
        body = request_body("chat", messages, True, self._settings.model, sampling)
        return Stream(self._send("POST", "/v1/chat/completions", body, stream=True))

    # -- server information -----------------------------------------------------------------------

    def models(self) -> list[Model]:
        data = self._json(self._send("GET", "/v1/models"))
        items = data.get("data") if isinstance(data, Mapping) else None
        return [parse_model(m) for m in items or []]

    def health(self) -> Any:
        """The ``/health`` body (parsed JSON, or text such as ``"ok"``); raises if the server is unwell."""
        return self._json(self._send("GET", "/health"))

    # -- plumbing ---------------------------------------------------------------------------------

    def _post_json(self, path: str, body: dict[str, Any]) -> Any:
        data = self._json(self._send("POST", path, body))
        if not isinstance(data, Mapping):  # a 200 that is not JSON: a proxy page, or not our server
            raise NextokenError(f"expected a JSON object from {path}, got {str(data)[:200]!r}")
        return data

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        return response_body(response)

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None, *,
              stream: bool = False) -> httpx.Response:
        """Send with retries; return a successful response (unread when ``stream``) or raise."""
        url = self._settings.base_url + path
        attempt = 0
        while True:
            request = self._http.build_request(method, url, json=body, headers=self._settings.headers(),
                                               timeout=self._settings.timeout)
            try:
                # the body is read below, so a transport error retried here is one before any response byte
                response = self._http.send(request, stream=True)
            except httpx.TransportError as e:
                if attempt < self._settings.max_retries and should_retry_exception(e):
                    time.sleep(retry_delay(attempt))
                    attempt += 1
                    continue
                raise transport_error(e, url) from e
            if response.is_success:
                if not stream:
                    try:
                        response.read()
                    except httpx.TransportError as e:  # the server answered: never sent twice
                        response.close()
                        raise transport_error(e, url) from e
                return response
            try:
                response.read()
            except httpx.TransportError as e:
                raise transport_error(e, url) from e
            finally:
                response.close()
            if attempt < self._settings.max_retries and should_retry_status(response.status_code,
                                                                             response.headers):
                time.sleep(retry_delay(attempt, response.headers))
                attempt += 1
                continue
            raise status_error(response)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
