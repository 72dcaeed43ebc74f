"""SDK behaviour against a scripted real HTTP server: bodies sent, retries and their timing,
streams cut or stalled. Scripts make each assertion exact: the server counts every request."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from nextoken_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    Client,
    NextokenError,
    OverloadedError,
    ServerError,
    StreamError,
    ValidationError,
)
from tests.clients.conftest import one_connection_client
from tests.clients.fakeserver import Reply, Script, completion
from tests.conftest import free_port

ERR = {"error": {"message": "max_tokens must be >= 1, got 0", "type": "invalid_request_error",
                 "param": "max_tokens", "code": None}}


def gaps(script: Script) -> list[float]:
    times = [t for t, _, _ in script.requests]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_complete_parses_result_and_sends_only_given_fields(fake: tuple[str, Script]) -> None:
    url, script = fake
    script.replies.append(Reply(body=completion("hello")))
    with Client(url + "/v1", api_key="sk-test") as client:
        out = client.complete("hi", max_tokens=2, temperature=0.0, seed=0, stop="\n", extra_body={"x": 1})
    assert (out.text, out.finish_reason, out.token_ids) == ("hello", "length", (1, 2))
    assert out.usage is not None and out.usage.total_tokens == 4
    _, body, headers = script.requests[0]
    # 0 is a value, not "unset": greedy temperature and seed 0 must reach the server.
    assert body == {"prompt": "hi", "max_tokens": 2, "temperature": 0.0, "seed": 0, "stop": ["\n"], "x": 1}
    assert headers["authorization"] == "Bearer sk-test"


def test_logprobs_arguments_follow_each_api_shape(fake: tuple[str, Script]) -> None:
    url, script = fake
    with Client(url) as client:
        client.complete("a", top_logprobs=3)
        client.chat([{"role": "user", "content": "a"}], logprobs=True, top_logprobs=2)
        with pytest.raises(TypeError, match="temprature"):
            client.complete("a", temprature=1.0)  # type: ignore[call-arg]
    assert script.requests[0][1]["logprobs"] == 3
    assert script.requests[1][1]["logprobs"] is True and script.requests[1][1]["top_logprobs"] == 2


def test_503_then_success_is_retried_after_retry_after(fake: tuple[str, Script]) -> None:
    url, script = fake
    busy = Reply(status=503, headers={"retry-after": "0.3"}, body={"error": {"message": "draining"}})
    script.replies += [busy, busy, Reply(body=completion("ok"))]
    with Client(url, max_retries=2) as client:
        assert client.complete("x").text == "ok"
    assert len(script.requests) == 3
    assert all(0.3 <= g < 1.0 for g in gaps(script))  # waited what the server asked, not our 0.5s backoff


def test_429_exhausting_retries_raises_overloaded(fake: tuple[str, Script]) -> None:
    url, script = fake
    script.replies += [Reply(status=429, headers={"retry-after": "0.1"}, body={"error": {"message": "queue full"}})] * 2
    with Client(url, max_retries=1) as client, pytest.raises(OverloadedError) as info:
        client.complete("x")
    assert info.value.retry_after == 0.1 and info.value.status_code == 429
    assert len(script.requests) == 2


@pytest.mark.parametrize(("status", "cls"), [(422, ValidationError), (500, ServerError)])
def test_non_retryable_errors_are_raised_at_once(fake: tuple[str, Script], status: int, cls: type) -> None:
    url, script = fake
    script.replies.append(Reply(status=status, body=ERR))
    with Client(url, max_retries=3) as client, pytest.raises(cls) as info:
        client.complete("x")
    assert info.value.param == "max_tokens" and len(script.requests) == 1


def test_stream_delivers_events_and_final(fake: tuple[str, Script]) -> None:
    url, script = fake
    script.replies.append(Reply(pieces=["a", "b", "c"]))
    with Client(url) as client, client.stream("x", max_tokens=3) as stream:
        events = list(stream)
    assert "".join(e.text for e in events) == "abc" and [e.token_ids for e in events[:3]] == [(0,), (1,), (2,)]
    assert events[-1].final and events[-1].finish_reason == "length"
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 3
    assert script.requests[0][1]["stream_options"] == {"include_usage": True}


def test_stream_is_retried_only_before_it_starts(fake: tuple[str, Script]) -> None:
    url, script = fake
    script.replies += [Reply(status=429, headers={"retry-after": "0"}, body={"error": {"message": "busy"}}),
                       Reply(pieces=["a", "b", "c", "d"], cut_after=2)]
    with Client(url, max_retries=3) as client:
        stream = client.stream("x")
        got = []
        with pytest.raises(StreamError) as info, stream:
            for event in stream:
                got.append(event.text)
    assert got == ["a", "b"] and info.value.text == "ab" and info.value.events == 2
    assert len(script.requests) == 2  # the 429 was retried; the cut stream was not
    assert stream.response.is_closed


def test_token_gap_longer_than_read_timeout_is_a_timeout(fake: tuple[str, Script]) -> None:
    url, script = fake
    script.replies.append(Reply(pieces=["a", "b"], stall=1.0))
    with Client(url, read_timeout=0.2) as client, client.stream("x") as stream:
        assert next(stream).text == "a"
        with pytest.raises(APITimeoutError):
            next(stream)


def test_connection_refused_retries_with_backoff_then_raises() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with Client(url, max_retries=2) as client, pytest.raises(APIConnectionError) as info:
        client.health()
    # Two backoffs: 0.5*(0.75..1) + 1.0*(0.75..1) seconds.
    assert 1.1 <= time.monotonic() - start < 3.0
    assert isinstance(info.value, ConnectionError) and not isinstance(info.value, APITimeoutError)


def test_models_and_health(fake: tuple[str, Script]) -> None:
    url, _ = fake
    with Client(url) as client:
        assert [m.id for m in client.models()] == ["fake"]
        assert client.health() == {"status": "ok"}


def test_async_client_mirrors_sync(fake: tuple[str, Script]) -> None:
    url, script = fake
    script.replies += [Reply(status=503, headers={"retry-after": "0"}, body={"error": {"message": "x"}}),
                       Reply(body=completion("done", "stop")), Reply(pieces=["x", "y"]),
                       Reply(pieces=["p", "q", "r"], cut_after=1), Reply(status=422, body=ERR)]

    async def main() -> None:
        async with AsyncClient(url, max_retries=1) as client:
            out = await client.chat([{"role": "user", "content": "hi"}])
            assert (out.text, out.finish_reason) == ("done", "stop")
            stream = await client.stream("x")
            async with stream:
                events = [e async for e in stream]
            assert [e.text for e in events] == ["x", "y", ""] and events[-1].final
            stream = await client.stream("x")
            with pytest.raises(StreamError) as info:
                async with stream:
                    async for _ in stream:
                        pass
            assert info.value.text == "p" and stream.response.is_closed
            with pytest.raises(ValidationError):
                await client.complete("x")
            assert [m.id for m in await client.models()] == ["fake"]

    asyncio.run(main())
    assert len(script.requests) == 5


def test_a_200_that_is_not_a_json_object_is_an_error_not_an_empty_result(fake: tuple[str, Script]) -> None:
    url, script = fake
    script.replies.append(Reply(body="<html>captive portal</html>"))
    with Client(url) as client, pytest.raises(NextokenError, match="captive portal"):
        client.complete("x")


def test_async_stream_every_form(fake: tuple[str, Script]) -> None:
    """`async for` over the call or the awaited call, `async with` over either; each closes its response."""
    url, script = fake
    script.replies += [Reply(pieces=["a", "b"]) for _ in range(5)]

    async def main() -> list[str]:
        got = []
        async with AsyncClient(url) as client:
            never_used = client.stream("x")  # nothing is sent until the stream is used
            assert script.requests == []
            await never_used.aclose()
            assert [e async for e in never_used] == [] and script.requests == []

            got.append("".join([e.text async for e in client.stream("x")]))

            stream = await client.stream("x")  # opened: the request has been answered
            assert len(script.requests) == 2 and not stream.response.is_closed
            got.append("".join([e.text async for e in stream]))
            assert stream.response.is_closed  # read to the end

            async with client.stream("x") as stream:
                got.append("".join([e.text async for e in stream]))
            assert stream.response.is_closed

            async with await client.stream("x") as stream:
                got.append("".join([e.text async for e in stream]))
            assert stream.response.is_closed

            got.append("".join([e.text async for e in client.chat_stream([{"role": "user", "content": "hi"}])]))
        return got

    assert asyncio.run(main()) == ["ab"] * 5
    assert [body.get("stream") for _, body, _ in script.requests] == [True] * 5
    assert "messages" in script.requests[-1][1]


def test_async_stream_break_returns_the_connection(fake: tuple[str, Script], no_cyclic_gc: None) -> None:
    url, script = fake
    # Each stream stalls after its first piece, so it is still open when the loop breaks.
    stalled, ok = Reply(pieces=["a", "b"], stall=5.0), Reply(body=completion("ok"))
    script.replies += [stalled, ok, stalled, ok, stalled, ok]

    async def main() -> None:
        async with one_connection_client(url) as client:
            async for event in client.stream("x"):
                assert event.text == "a"
                break
            assert (await client.complete("x")).text == "ok"  # the one connection came back

            async with client.stream("x") as stream:
                async for _ in stream:
                    break
            assert stream.response.is_closed
            assert (await client.complete("x")).text == "ok"

            # The check can fail: a stream kept alive and unclosed after a break holds the connection.
            held = await client.stream("x")
            async for _ in held:
                break
            with pytest.raises(APITimeoutError):
                await client.complete("x")
            await held.aclose()
            assert (await client.complete("x")).text == "ok"

    asyncio.run(main())


def test_sync_stream_break_returns_the_connection(fake: tuple[str, Script], no_cyclic_gc: None) -> None:
    url, script = fake
    script.replies += [Reply(pieces=["a", "b"], stall=5.0), Reply(body=completion("ok"))]
    with httpx.Client(limits=httpx.Limits(max_connections=1)) as http:
        client = Client(url, http_client=http, max_retries=0, connect_timeout=1.0)
        for _ in client.stream("x"):
            break
        assert client.complete("x").text == "ok"


def test_async_stream_errors_raise_where_the_stream_is_used(fake: tuple[str, Script]) -> None:
    url, script = fake
    script.replies += [Reply(status=400, body=ERR), Reply(status=400, body=ERR), Reply(status=400, body=ERR),
                       Reply(status=429, headers={"retry-after": "0"}, body={"error": {"message": "busy"}}),
                       Reply(pieces=["p", "q", "r"], cut_after=1)]

    async def main() -> None:
        async with AsyncClient(url, max_retries=1) as client:
            with pytest.raises(ValidationError) as info:
                async for _ in client.stream("x"):
                    pass
            assert info.value.status_code == 400 and info.value.param == "max_tokens"
            with pytest.raises(ValidationError):
                async with client.stream("x"):
                    pass
            with pytest.raises(ValidationError):
                await client.stream("x")
            # Opening is retried (the 429); the stream cut after its first piece is not.
            got = []
            with pytest.raises(StreamError) as cut:
                async for event in client.stream("x"):
                    got.append(event.text)
            assert got == ["p"] and cut.value.text == "p"

    asyncio.run(main())
    assert len(script.requests) == 5
