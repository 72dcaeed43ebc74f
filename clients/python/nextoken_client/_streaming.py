"""Server-sent events: an incremental decoder, the chunk → ``StreamEvent`` conversion, and the
``Stream`` / ``AsyncStream`` iterators that own (and always close) the HTTP response.

It knows nothing about requests or retries: by the time a stream exists its response has started,
and from then on a failure is a ``StreamError`` (or ``APITimeoutError`` when the per-token read
timeout expired), never a retry.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from ._exceptions import APITimeoutError, StreamError
from ._types import StreamEvent, Usage, choice_text, choice_token_ids, parse_logprobs, parse_usage

__all__ = ["ServerSentEvent", "SSEDecoder", "Stream", "AsyncStream"]


@dataclass(frozen=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Incremental decoder for the ``text/event-stream`` format (WHATWG HTML, "server-sent events").

    Feed it byte chunks split anywhere (mid-line, mid-UTF-8 sequence, between ``\\r`` and ``\\n``);
    it returns the events completed so far. A line still incomplete when the body ends is dropped:
    it is what a server killed mid-write leaves behind, and parsing it would invent data.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""  # text after the last line break
        self._skip_lf = False  # the previous chunk ended in "\r": a leading "\n" belongs to it
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        text = self._utf8.decode(chunk)
        if self._skip_lf and text.startswith("\n"):
            text = text[1:]
        self._skip_lf = False
        self._buffer += text
        events: list[ServerSentEvent] = []
        while True:
            cut = _first_line_break(self._buffer)
            if cut < 0:
                break
            line = self._buffer[:cut]
            if self._buffer[cut] == "\r":
                if cut + 1 == len(self._buffer):  # "\r" then maybe "\n" in the next chunk
                    self._skip_lf = True
                    self._buffer = ""
                elif self._buffer[cut + 1] == "\n":
                    self._buffer = self._buffer[cut + 2:]
                else:
                    self._buffer = self._buffer[cut + 1:]
            else:
                self._buffer = self._buffer[cut + 1:]
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:  # a blank line dispatches the event gathered so far
            if not self._data:
                self._event = ""
                return None
            event = ServerSentEvent("\n".join(self._data), self._event or "message", self._id, self._retry)
            self._data, self._event = [], ""
            return event
        if line.startswith(":"):  # comment, e.g. a keep-alive ping
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None  # unknown fields are ignored, as the standard says

    def flush(self) -> list[ServerSentEvent]:
        """At end of body: dispatch an event whose complete ``data:`` lines lacked the final blank line."""
        self._buffer = ""
        event = self._line("")
        return [event] if event is not None else []


def _first_line_break(text: str) -> int:
    positions = [p for p in (text.find("\r"), text.find("\n")) if p >= 0]
    return min(positions) if positions else -1


def iter_sse(chunks: Iterable[bytes]) -> Iterator[ServerSentEvent]:
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.flush()


class _EventBuilder:
    """Turns OpenAI stream chunks into ``StreamEvent``s and remembers the finish reason and usage,
    which arrive in separate chunks, until it can emit the final event."""

    def __init__(self) -> None:
        self.done = False
        self.id = ""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.text: list[str] = []
        self.events = 0

    def feed(self, sse: ServerSentEvent) -> list[StreamEvent]:
        if sse.data.strip() == "[DONE]":
            self.done = True
            return [self._final()]
        try:
            chunk: Any = json.loads(sse.data)
        except json.JSONDecodeError:
            raise self.error(f"the server sent a non-JSON stream chunk: {sse.data[:200]!r}") from None
        if not isinstance(chunk, dict):
            return []
        if "error" in chunk:  # an error after the 200: the generation failed mid-way
            err = chunk["error"]
            message = err.get("message") if isinstance(err, dict) else str(err)
            raise self.error(f"the server reported an error mid-stream: {message}")
        self.id = str(chunk["id"]) if isinstance(chunk.get("id"), str) and chunk["id"] else self.id
        self.usage = parse_usage(chunk.get("usage")) or self.usage
        out: list[StreamEvent] = []
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            # Only the first choice is surfaced: the SDK never asks for n > 1.
            if not isinstance(choice, dict) or choice.get("index", 0) not in (0, None):
                continue
            text, ids = choice_text(choice), choice_token_ids(choice)
            logprobs = parse_logprobs(choice.get("logprobs"))
            if text or ids or logprobs:
                self.text.append(text)
                self.events += 1
                out.append(StreamEvent(text=text, token_ids=ids, logprobs=logprobs, id=self.id))
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        return out

    def _final(self) -> StreamEvent:
        return StreamEvent(finish_reason=self.finish_reason, usage=self.usage, final=True, id=self.id)

    def end(self) -> list[StreamEvent]:
        """The body ended. Without ``[DONE]`` the answer is complete only if a finish reason came."""
        if self.done:
            return []
        if self.finish_reason is not None:
            self.done = True
            return [self._final()]
        raise self.error("the stream ended before the server finished the answer")

    def error(self, message: str) -> StreamError:
        return StreamError(message, text="".join(self.text), events=self.events)


def _iter_events(response: httpx.Response, builder: _EventBuilder) -> Generator[StreamEvent, None, None]:
    # A module function, not a method: a generator holding its stream would form a reference cycle,
    # and then a loop that breaks early would leave the connection checked out until the cyclic GC
    # ran. Without the cycle, dropping the stream closes the generator, whose finally closes the
    # response.
    decoder = SSEDecoder()
    try:
        for chunk in response.iter_bytes():
            for sse in decoder.feed(chunk):
                yield from builder.feed(sse)
                if builder.done:
                    return
        for sse in decoder.flush():
            yield from builder.feed(sse)
        yield from builder.end()
    except httpx.TimeoutException as e:
        raise APITimeoutError(f"no token within the read timeout after {builder.events} events: {e}") from e
    except httpx.TransportError as e:
        raise builder.error(f"the connection broke mid-stream after {builder.events} events: {e}") from e
    finally:
        response.close()


async def _aiter_events(response: httpx.Response, builder: _EventBuilder) -> AsyncGenerator[StreamEvent, None]:
    # No reference to the stream, as in _iter_events: when `async for event in client.stream(...)`
    # breaks, the stream is freed at once and asyncio's async-generator finalizer runs this
    # finally on the loop, returning the connection without waiting for the cyclic GC.
    decoder = SSEDecoder()
    try:
        async for chunk in response.aiter_bytes():
            for sse in decoder.feed(chunk):
                for event in builder.feed(sse):
                    yield event
                if builder.done:
                    return
        for sse in decoder.flush():
            for event in builder.feed(sse):
                yield event
        for event in builder.end():
            yield event
    except httpx.TimeoutException as e:
        raise APITimeoutError(f"no token within the read timeout after {builder.events} events: {e}") from e
    except httpx.TransportError as e:
        raise builder.error(f"the connection broke mid-stream after {builder.events} events: {e}") from e
    finally:
        await response.aclose()


class Stream(Iterator[StreamEvent]):
    """Iterate over a completion as it is generated; use it in a ``with`` block (or call ``close()``)
    so the connection returns to the pool even when you stop early."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._builder = _EventBuilder()
        self._iterator = _iter_events(response, self._builder)

    @property
    def text(self) -> str:
        """Text received so far."""
        return "".join(self._builder.text)

    def __next__(self) -> StreamEvent:
        return next(self._iterator)

    def __iter__(self) -> Iterator[StreamEvent]:
        return self

    def close(self) -> None:
        self._iterator.close()  # runs the generator's finally if it had started
        self.response.close()  # and covers the case where it never did

    def __enter__(self) -> Stream:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncStream(AsyncIterator[StreamEvent]):
    """The async twin of ``Stream``. ``AsyncClient.stream()`` returns one that opens its request on
    first use, so each of these works, with the same retries while opening::

        async for event in client.stream(...): ...           # the stream closes when dropped
        async with client.stream(...) as stream: ...         # closes on leaving the block
        stream = await client.stream(...)                    # open now: errors raise here
        async with await client.stream(...) as stream: ...

    Prefer ``async with`` (or ``aclose()``) when you may stop early and keep a reference.
    """

    def __init__(self, response: httpx.Response | None = None, *,
                 opener: Callable[[], Awaitable[httpx.Response]] | None = None) -> None:
        if (response is None) == (opener is None):
            raise TypeError("AsyncStream takes either an open response or an opener")
        self._response = response
        self._opener = opener
        self._builder = _EventBuilder()
        self._iterator = None if response is None else _aiter_events(response, self._builder)
        self._opening = False
        self._closed = False

    @property
    def response(self) -> httpx.Response:
        if self._response is None:
            raise RuntimeError("the stream is not open yet: await it, or use it with async with / async for")
        return self._response

    @property
    def text(self) -> str:
        return "".join(self._builder.text)

    async def _open(self) -> AsyncStream:
        if self._iterator is not None or self._closed:
            return self
        if self._opening:  # a second open would send the request twice and leak one response
            raise RuntimeError("this stream is already being opened by another task")
        assert self._opener is not None
        self._opening = True
        try:
            self._response = await self._opener()
        finally:
            self._opening = False
        if self._closed:  # aclose() came while the request was in flight: nobody will read it
            await self._response.aclose()
            return self
        self._iterator = _aiter_events(self._response, self._builder)
        return self

    def __await__(self) -> Generator[Any, None, AsyncStream]:
        return self._open().__await__()

    async def __anext__(self) -> StreamEvent:
        if self._iterator is None:
            await self._open()
            if self._iterator is None:  # closed before it was ever opened
                raise StopAsyncIteration
        return await self._iterator.__anext__()

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        return self

    async def aclose(self) -> None:
        self._closed = True
        if self._iterator is not None:
            await self._iterator.aclose()  # runs its finally if it had started
        if self._response is not None:
            await self._response.aclose()  # and covers the case where it never did

    async def __aenter__(self) -> AsyncStream:
        return await self._open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
