"""The SDK and the load tester against the real ``nextoken serve`` process on loopback.

Skipped, with the reason printed, until ``nextoken.serve`` can start. Each exception path is
produced by the real server: a validation error from its boundary checks, a 401 from
``--api-key-env``, a 429 from a server saturated with ``--max-batch-size 1 --max-queue 1``, a
``StreamError`` from SIGKILLing it mid-stream, and connection refused once it is dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from nextoken_client import (
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    ChatMessage,
    Client,
    NextokenError,
    OverloadedError,
    Stream,
    StreamError,
    StreamEvent,
    ValidationError,
)
from nextoken_client.loadtest.cli import main as loadtest_main
from tests.clients.conftest import one_connection_client
from tests.conftest import REPO, ServerProcess

pytestmark = pytest.mark.slow
PROMPT = "the cat sat"


def test_complete_and_stream_agree_under_greedy_decoding(real_server: ServerProcess) -> None:
    with Client(real_server.url) as client:
        done = client.complete(PROMPT, max_tokens=12, temperature=0.0)
        with client.stream(PROMPT, max_tokens=12, temperature=0.0) as stream:
            events = list(stream)
    assert done.finish_reason in ("stop", "length") and done.usage is not None
    assert 1 <= done.usage.completion_tokens <= 12 and done.usage.prompt_tokens > 0
    final = events[-1]
    assert final.final and final.finish_reason == done.finish_reason
    assert final.usage is not None and final.usage.completion_tokens == done.usage.completion_tokens
    # Greedy decoding is deterministic, so the streamed pieces must rebuild the same text.
    assert "".join(e.text for e in events) == done.text
    ids = [i for e in events for i in e.token_ids]
    if ids:  # the token_ids extension, when the server sends it, covers every generated token
        assert len(ids) == final.usage.completion_tokens


def test_logprobs_when_asked(real_server: ServerProcess) -> None:
    with Client(real_server.url) as client:
        out = client.complete(PROMPT, max_tokens=4, temperature=0.0, top_logprobs=2)
        plain = client.complete(PROMPT, max_tokens=4, temperature=0.0)
    assert out.logprobs and plain.logprobs is None
    for entry in out.logprobs:
        assert entry.logprob is not None and entry.logprob <= 0.0
        assert 1 <= len(entry.top) <= 3 and max(t.logprob for t in entry.top) >= entry.logprob - 1e-4


def test_chat_models_health(real_server: ServerProcess) -> None:
    with Client(real_server.url) as client:
        reply = client.chat([{"role": "user", "content": "hello"}], max_tokens=6, temperature=0.0)
        with client.chat_stream([{"role": "user", "content": "hello"}], max_tokens=6, temperature=0.0) as s:
            streamed = "".join(e.text for e in s)
        models = client.models()
        client.health()
    assert reply.text == streamed and reply.finish_reason in ("stop", "length")
    assert models and all(m.id for m in models)


def test_async_client_complete_and_concurrent_streams(real_server: ServerProcess) -> None:
    async def main() -> tuple[str, list[str]]:
        async with AsyncClient(real_server.url) as client:
            done = await client.complete(PROMPT, max_tokens=8, temperature=0.0)

            async def one() -> str:
                async with await client.stream(PROMPT, max_tokens=8, temperature=0.0) as stream:
                    return "".join([e.text async for e in stream])

            return done.text, await asyncio.gather(*(one() for _ in range(4)))

    text, streamed = asyncio.run(main())
    # Four requests batched together must each still get the single-request greedy answer.
    assert streamed == [text] * 4


def test_async_stream_every_form(real_server: ServerProcess) -> None:
    """`async for` over the call or the awaited call, `async with` over either, and chat: all the
    greedy answer; a refused request raises its ValidationError wherever the stream is first used."""
    hello: list[ChatMessage] = [{"role": "user", "content": "hello"}]
    greedy = {"max_tokens": 8, "temperature": 0.0}

    async def main() -> None:
        async with AsyncClient(real_server.url) as client:
            done = await client.complete(PROMPT, **greedy)
            texts = ["".join([e.text async for e in client.stream(PROMPT, **greedy)])]
            stream = await client.stream(PROMPT, **greedy)
            texts.append("".join([e.text async for e in stream]))
            async with client.stream(PROMPT, **greedy) as stream:
                texts.append("".join([e.text async for e in stream]))
            async with await client.stream(PROMPT, **greedy) as stream:
                texts.append("".join([e.text async for e in stream]))
            assert texts == [done.text] * 4 and stream.response.is_closed
            chat = await client.chat(hello, **greedy)
            assert "".join([e.text async for e in client.chat_stream(hello, **greedy)]) == chat.text

            too_long = {"max_tokens": 100_000}  # past the model's 512-token context
            with pytest.raises(ValidationError) as info:
                async for _ in client.stream(PROMPT, **too_long):
                    pass
            assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"
            with pytest.raises(ValidationError):
                async with client.stream(PROMPT, **too_long):
                    pass
            with pytest.raises(ValidationError):
                await client.chat_stream(hello, **too_long)

    asyncio.run(main())


def test_async_stream_break_frees_the_connection(real_server: ServerProcess, no_cyclic_gc: None) -> None:
    """Leaving `async for` over the call early closes the stream at once: the next request gets
    the client's only connection instead of timing out waiting for it."""

    async def main() -> str:
        async with one_connection_client(real_server.url) as client:
            async for event in client.stream(PROMPT, max_tokens=400, extra_body={"ignore_eos": True}):
                if event.text:
                    break
            return (await client.complete(PROMPT, max_tokens=2)).finish_reason or ""

    assert asyncio.run(main()) in ("stop", "length")


def sdk_examples() -> list[Any]:
    """The README's Python blocks that use the SDK (the project's README and the client's own)."""
    found = []
    for path in (REPO / "README.md", REPO / "clients" / "python" / "README.md"):
        blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)
        found += [pytest.param(code, id=f"{path.relative_to(REPO)}:{i}")
                  for i, code in enumerate(blocks) if "nextoken_client" in code]
    return found


@pytest.mark.parametrize("code", sdk_examples())
def test_readme_sdk_examples_run_as_written(real_server: ServerProcess, code: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Each example, pointed at the test server instead of port 8000, runs and prints an answer."""
    assert "http://127.0.0.1:8000" in code
    exec(compile(code.replace("http://127.0.0.1:8000", real_server.url), "README example", "exec"),
         {"__name__": "__main__"})
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("bad", [{"top_p": 2.0}, {"max_tokens": 0}, {"temperature": -1.0}])
def test_invalid_sampling_is_a_validation_error(real_server: ServerProcess, bad: dict[str, float]) -> None:
    with Client(real_server.url) as client, pytest.raises(ValidationError) as info:
        client.complete(PROMPT, **bad)  # type: ignore[arg-type]
    assert info.value.status_code in (400, 422) and info.value.message
    if info.value.param is not None:
        assert info.value.param == next(iter(bad))


@pytest.fixture(scope="module")
def locked_server(serve_artifact: Path) -> Iterator[ServerProcess]:
    """API key required; one slot and a one-request queue, so a handful of requests saturate it."""
    server = ServerProcess(serve_artifact, "--api-key-env", "NEXTOKEN_TEST_KEY", "--max-batch-size", "1",
                        "--max-queue", "1", env={"NEXTOKEN_TEST_KEY": "sk-right"})
    yield server
    server.stop()


def test_wrong_or_missing_key_is_401(locked_server: ServerProcess) -> None:
    for key in ("sk-wrong", ""):
        with Client(locked_server.url, api_key=key) as client, pytest.raises(AuthenticationError) as info:
            client.complete(PROMPT, max_tokens=2)
        assert info.value.status_code == 401
    with Client(locked_server.url, api_key="sk-right") as client:
        assert client.complete(PROMPT, max_tokens=2).usage is not None


def test_saturated_server_answers_429_with_retry_after(locked_server: ServerProcess) -> None:
    """12 streams at a 1-slot, 1-queue server whose engine is frozen: two are admitted and wait, ten are
    refused at once (OverloadedError, never retried with max_retries=0); then the two complete."""
    async def main() -> list[BaseException | str]:
        async with AsyncClient(locked_server.url, api_key="sk-right", max_retries=0) as client:
            async def one() -> str:
                async with await client.stream(PROMPT, max_tokens=100, temperature=1.0) as stream:
                    return "".join([e.text async for e in stream])

            tasks = [asyncio.ensure_future(one()) for _ in range(12)]
            with locked_server.engine_frozen():
                deadline = time.monotonic() + 30
                while sum(t.done() for t in tasks) < 10:  # the refusals; the admitted two wait for the engine
                    assert time.monotonic() < deadline, [t for t in tasks if t.done()]
                    await asyncio.sleep(0.01)
                assert sum(t.done() for t in tasks) == 10
            return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, OverloadedError)]
    assert len(refused) == 10 and all(r.status_code == 429 and r.retry_after is not None for r in refused), results
    assert sum(isinstance(r, str) for r in results) == 2, results
    assert any(isinstance(r, str) for r in results)  # and the admitted ones completed
    # With retries on, the SDK waits out Retry-After and gets through.
    with Client(locked_server.url, api_key="sk-right", max_retries=4) as client:
        assert client.complete(PROMPT, max_tokens=2).finish_reason in ("stop", "length")


def test_loadtest_sweep_against_the_server(locked_server: ServerProcess, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rc = loadtest_main(["--base-url", locked_server.url, "--api-key", "sk-right", "--concurrency", "1,4",
                        "--num-requests", "8", "--warmup", "1", "--input-len", "3", "--output-len", "8",
                        "--slo", "ttft=10000,tpot=1000", "--json-out", str(tmp_path / "r.json"),
                        "--plot-dir", str(tmp_path / "plots"), "--no-progress"])
    assert rc == 0
    levels = json.loads((tmp_path / "r.json").read_text())["levels"]
    assert levels[0]["completed"] == 8 and levels[0]["failed"] == 0  # one at a time always fits
    assert levels[0]["ttft_ms"]["p50"] > 0 and levels[0]["total_input_tokens"] > 0
    # At concurrency 4 against one slot and a one-deep queue, refusals are counted, not hidden.
    assert levels[1]["completed"] + levels[1]["failed"] == 8
    assert set(levels[1]["failures"]) <= {"OverloadedError(429)"}
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "latency_distribution.png", "throughput.png", "ttft_p99.png"]


def test_loadtest_shows_the_servers_refusal(real_server: ServerProcess, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """max_tokens past the context: every request is a 400, and the report says why, in the
    console and in the JSON."""
    rc = loadtest_main(["--base-url", real_server.url, "--concurrency", "1", "--num-requests", "4", "--warmup", "0",
                        "--input-len", "3", "--output-len", "1000", "--json-out", str(tmp_path / "sweep.json"),
                        "--no-progress"])
    assert rc == 1  # nothing completed
    out = capsys.readouterr().out
    assert "failures at concurrency=1: 4 of 4 requests" in out
    said = re.compile(r"ValidationError\(400\): prompt \(\d+ tokens\) \+ max_tokens \(1000\) = \d+ exceeds this "
                      r"\w+'s context of 512 tokens \(type: \w+, param: max_tokens, code: context_length_exceeded\)$")
    assert any(said.search(line) for line in out.splitlines()), out
    level = json.loads((tmp_path / "sweep.json").read_text())["levels"][0]
    assert level["failures"] == {"ValidationError(400)": 4}
    details = level["failure_details"]
    assert sum(d["count"] for d in details) == 4
    for d in details:
        assert d["kind"] == "ValidationError(400)" and "max_tokens (1000)" in d["message"]
        assert (d["param"], d["code"]) == ("max_tokens", "context_length_exceeded") and d["type"]


def test_server_killed_mid_stream_then_refused(serve_artifact: Path) -> None:
    """A kill after the first token: StreamError with the text so far, never a retry; then refused.

    Eight long requests and the stream under test are admitted while the engine is frozen, so all
    nine share the batch from the first step and the stream is hundreds of steps from its end when
    the kill comes (alone, the tiny model could finish 400 tokens before the client reads one).
    """
    server = ServerProcess(serve_artifact, "--max-batch-size", "9", "--max-queue", "0")
    busy: list[threading.Thread] = []
    try:
        def occupy() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(server.url + "/v1/completions", timeout=60,
                           json={"prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "logprobs": 5})

        busy = [threading.Thread(target=occupy) for _ in range(8)]
        with Client(server.url, max_retries=0) as client, ThreadPoolExecutor(1) as pool:
            def open_stream() -> tuple[Stream, StreamEvent]:
                # Sent while the engine is frozen: the server answers a stream only with its first
                # token, so opening it before the freeze let it run alone (and, on a busy machine,
                # finish) before the other eight arrived, and the server never filled up.
                opened = client.stream(PROMPT, max_tokens=400, temperature=1.0, extra_body={"ignore_eos": True})
                return opened, next(opened)

            with server.engine_frozen():
                for t in busy:
                    t.start()
                opening = pool.submit(open_stream)  # its 200 and first token come once the engine runs
                server.wait_until_full()  # all nine admitted
            stream, first = opening.result(60)
            with pytest.raises(NextokenError) as info, stream:
                server.kill()
                for _ in stream:
                    pass
            # A kill after the first token leaves the answer cut short: StreamError, never a retry.
            assert isinstance(info.value, StreamError), f"got {info.value!r}"
            assert info.value.text.startswith(first.text)
            with pytest.raises(APIConnectionError):
                client.complete(PROMPT, max_tokens=2)
    finally:
        server.stop()
        for t in busy:
            t.join(10)
