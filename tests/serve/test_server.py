"""The real server process: OpenAI endpoints, streaming, batching, validation, limits, auth, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import ServerProcess, metric


def post(url: str, body: dict, path: str = "/v1/completions", **kw) -> httpx.Response:
    kw.setdefault("timeout", 60)
    return httpx.post(url + path, json=body, **kw)


def stream_chunks(url: str, body: dict, path: str = "/v1/completions") -> list:
    chunks = []
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                chunks.append(data if data == "[DONE]" else json.loads(data))
    return chunks


# --- happy paths -------------------------------------------------------------------------------
def test_health_and_models(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert httpx.get(server.url + "/ready").json() == {"status": "ok", "model": "tiny-serve:1"}
    data = httpx.get(server.url + "/v1/models").json()["data"]
    assert data[0]["id"] == "tiny-serve:1" and data[0]["version"] == "1" and data[0]["context_length"] == 512


def test_completion_non_streaming(server: ServerProcess) -> None:
    r = post(server.url, {"prompt": "the cat", "max_tokens": 7, "temperature": 0, "ignore_eos": True})
    body = r.json()
    assert r.status_code == 200, body
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 7
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 7, "total_tokens": 15,
                             "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}}


def test_streaming_matches_non_streaming_and_shares_one_id(server: ServerProcess) -> None:
    req = {"prompt": "the dog", "max_tokens": 20, "temperature": 0, "ignore_eos": True,
           "stream_options": {"include_usage": True}}
    chunks = stream_chunks(server.url, req)
    assert chunks[-1] == "[DONE]"
    usage_chunk, body_chunks = chunks[-2], chunks[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 20
    assert len({c["id"] for c in chunks[:-1]}) == 1
    assert [c["choices"][0]["finish_reason"] for c in body_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in body_chunks[:-1])
    streamed = "".join(c["choices"][0]["text"] for c in body_chunks)
    whole = post(server.url, {k: v for k, v in req.items() if k != "stream_options"}).json()
    assert streamed == whole["choices"][0]["text"]


def test_stop_string_is_never_emitted(server: ServerProcess) -> None:
    base = {"prompt": "the cat", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    full = post(server.url, base).json()["choices"][0]["text"]
    stop = full[5:8]
    assert len(stop) == 3
    r = post(server.url, {**base, "stop": [stop]}).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["text"] == full[: full.index(stop)]
    chunks = stream_chunks(server.url, {**base, "stop": stop})
    text = "".join(c["choices"][0]["text"] for c in chunks if c != "[DONE]")
    assert text == full[: full.index(stop)] and stop not in text


def test_chat_completion_and_stream(server: ServerProcess) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = post(server.url, {"messages": msgs, "max_tokens": 5, "temperature": 0}, "/v1/chat/completions").json()
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    chunks = stream_chunks(server.url, {"messages": msgs, "max_tokens": 5, "temperature": 0}, "/v1/chat/completions")
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c != "[DONE]")
    assert text == r["choices"][0]["message"]["content"]


def test_logprobs(server: ServerProcess) -> None:
    r = post(server.url, {"prompt": "the", "max_tokens": 3, "temperature": 0, "logprobs": 2}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and all(len(t) == 2 for t in lp["top_logprobs"])
    # greedy: the chosen token is the most likely one
    assert all(abs(max(t.values()) - c) < 1e-6 for t, c in zip(lp["top_logprobs"], lp["token_logprobs"],
                                                                strict=True))


def test_chat_logprobs_through_the_openai_client_streamed_and_not(server: ServerProcess) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    kw = {"model": "tiny-serve:1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
          "temperature": 0, "logprobs": True, "top_logprobs": 3, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**kw).choices[0]
    content = whole.logprobs.content
    assert "".join(c.token for c in content) == whole.message.content and len(content) == 6
    for c in content:  # greedy: the chosen token is the most likely of its alternatives
        assert len(c.top_logprobs) == 3 and c.logprob == pytest.approx(c.top_logprobs[0].logprob)
        assert bytes(c.bytes).decode() == c.token
    streamed = [lp for ch in client.chat.completions.create(**kw, stream=True) if ch.choices
                for lp in (ch.choices[0].logprobs.content if ch.choices[0].logprobs else [])]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]


@pytest.fixture(scope="module")
def six(serve_artifact):
    """Six places (slots, no queue): once six requests are admitted (a seventh gets 429), they share steps."""
    s = ServerProcess(serve_artifact, "--max-batch-size", "6", "--max-queue", "0")
    yield s
    s.stop()


def run_together(server: ServerProcess, bodies: list[dict]) -> list[httpx.Response]:
    """Send ``bodies`` at once with the engine frozen until every one is admitted, so they run together
    from the first step however fast the engine is."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        with server.engine_frozen():
            futures = [pool.submit(post, server.url, b) for b in bodies]
            server.wait_until_full()
        return [f.result() for f in futures]


def test_seed_gives_the_same_text_alone_and_in_a_busy_batch(six: ServerProcess) -> None:
    req = {"prompt": "hello", "max_tokens": 30, "temperature": 1.0, "seed": 42, "ignore_eos": True}
    alone = post(six.url, req).json()["choices"][0]["text"]
    answers = run_together(six, [req if i == 3 else {**req, "seed": 1000 + i, "max_tokens": 60} for i in range(6)])
    texts = [r.json()["choices"][0]["text"] for r in answers]
    assert texts[3] == alone
    assert len(set(texts)) > 1  # the others really sampled something else


def test_concurrent_requests_share_engine_steps(six: ServerProcess) -> None:
    before = metric(six.url, "nextoken_batch_size_sum")
    steps_before = metric(six.url, "nextoken_batch_size_count")
    answers = run_together(six, [{"prompt": "the", "max_tokens": 200, "ignore_eos": True}] * 6)
    assert [r.status_code for r in answers] == [200] * 6
    rows = metric(six.url, "nextoken_batch_size_sum") - before
    steps = metric(six.url, "nextoken_batch_size_count") - steps_before
    # 6 x 200 tokens, each produced by one row of one step (a prompt's last chunk gives its first token,
    # decode steps the rest), the six side by side: ~200 steps, where one request at a time needs 1200.
    # A request holds its place from the moment its body is read, before it is parsed and sent to the
    # engine, so the last of the six may join a few tiny steps after the first (215 in one run).
    assert rows == 1200 and steps <= 300


# --- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "top_k": -5}, "top_k"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "x", "seed": "abc"}, "seed"),
    ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "n": 0}, "n"),  # n = 2 is served now (one engine request per choice)
    ({"prompt": "x", "n": 129}, "n"),
    ({"prompt": "x", "n": 25}, "n"),  # more choices than the server runs or queues (8 + 16): never admissible
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "logit_bias": {"1000": 5}}, "logit_bias"),
    ({"prompt": "x", "echo": True, "max_tokens": 512}, "max_tokens"),
    ({"prompt": [[1, 2], "x"]}, "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": 12}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "max_tokens": 600}, "max_tokens"),
    ({"prompt": "x" * 600}, "prompt"),
])
def test_validation_errors_name_the_field(server: ServerProcess, body: dict, param: str) -> None:
    r = post(server.url, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_context_error_gives_both_numbers(server: ServerProcess) -> None:
    err = post(server.url, {"prompt": "x" * 600}).json()["error"]
    assert "601 tokens" in err["message"] and "512" in err["message"] and err["code"] == "context_length_exceeded"


def test_chat_validation(server: ServerProcess) -> None:
    for msgs, param in [([], "messages"), ([{"role": "robot", "content": "x"}], "messages[0].role"),
                        ([{"role": "user", "content": 5}], "messages[0].content")]:
        r = post(server.url, {"messages": msgs}, "/v1/chat/completions")
        assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_malformed_json_wrong_type_and_oversized_body(server: ServerProcess) -> None:
    url = server.url + "/v1/completions"
    r = httpx.post(url, content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, content=b"prompt=x", headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "Content-Type" in r.json()["error"]["message"]
    r = httpx.post(url, content=b'{"prompt": "x"}')  # no content type at all
    assert r.status_code == 415
    big = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    r = httpx.post(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(("raw", "path", "code", "param"), [
    # Python's json accepts NaN and Infinity, and NaN passes every range check: temperature NaN used to sample.
    (b'{"prompt": "x", "temperature": NaN}', "/v1/completions", "invalid_json", None),
    (b'{"prompt": "x", "top_p": Infinity}', "/v1/completions", "invalid_json", None),
    # A lone surrogate is valid JSON but no tokenizer takes it: it used to be a 500.
    (b'{"prompt": "\\ud800"}', "/v1/completions", "invalid_value", "prompt"),
    (b'{"prompt": "x", "stop": ["\\udfff"]}', "/v1/completions", "invalid_value", "stop"),
    (b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', "/v1/chat/completions", "invalid_value",
     "messages[0].content"),
])
def test_json_the_parser_accepts_but_the_api_must_not(server: ServerProcess, raw: bytes, path: str, code: str,
                                                       param: str | None) -> None:
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["param"] == param


def test_negative_seed_and_tiny_temperature_are_served(server: ServerProcess) -> None:
    # numpy refuses negative seeds; OpenAI allows any integer. It used to come back as a context-length error.
    req = {"prompt": "the", "max_tokens": 12, "seed": -7, "ignore_eos": True}
    a, b = post(server.url, req), post(server.url, req)
    assert a.status_code == 200, a.text
    assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]
    # 1e-300 overflows a logits / temperature division: it samples as greedy instead of NaN soup.
    tiny = post(server.url, {**req, "temperature": 1e-300}).json()["choices"][0]
    greedy = post(server.url, {**req, "temperature": 0}).json()["choices"][0]
    assert tiny["token_ids"] == greedy["token_ids"]


def test_unknown_paths_and_methods_get_openai_error_bodies(server: ServerProcess) -> None:
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_unknown_model_is_404(server: ServerProcess) -> None:
    r = post(server.url, {"prompt": "x", "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_the_server_still_works_after_bad_requests(server: ServerProcess) -> None:
    assert post(server.url, {"prompt": "the", "max_tokens": 2}).status_code == 200


def test_openai_client_both_endpoints(server: ServerProcess) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    c = client.completions.create(model="tiny-serve:1", prompt="the cat", max_tokens=5, temperature=0)
    assert c.choices[0].finish_reason in ("length", "stop") and c.usage.completion_tokens >= 1
    text = "".join(ch.choices[0].text for ch in client.completions.create(
        model="tiny-serve:1", prompt="the cat", max_tokens=5, temperature=0, stream=True))
    assert text == c.choices[0].text
    msgs = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="tiny-serve:1", messages=msgs, max_tokens=4, temperature=0)
    parts = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="tiny-serve:1", messages=msgs, max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}) if ch.choices]
    assert "".join(parts) == chat.choices[0].message.content
    assert [m.id for m in client.models.list()] == ["tiny-serve:1"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny-serve:1", prompt="x", temperature=5)


# --- limits, cancellation, auth, signals ---------------------------------------------------------
@pytest.fixture(scope="module")
def narrow(serve_artifact):
    s = ServerProcess(serve_artifact, "--max-batch-size", "1", "--max-queue", "0")
    yield s
    s.stop()


def test_overload_gets_429_with_retry_after_at_once(narrow: ServerProcess) -> None:
    """With the one place taken and the engine frozen, seven more requests are all answered 429:
    refused at once, never queued (a queued request could not be answered while nothing runs)."""
    held: list[int] = []
    holder = threading.Thread(target=lambda: held.append(
        post(narrow.url, {"prompt": "the", "max_tokens": 500, "ignore_eos": True}).status_code))
    with narrow.engine_frozen():
        holder.start()
        narrow.wait_until_full()
        with ThreadPoolExecutor(7) as pool:
            answers = list(pool.map(lambda _: post(narrow.url, {"prompt": "the", "max_tokens": 5}), range(7)))
        assert holder.is_alive()  # the running request is still waiting for the engine
    holder.join(60)
    assert held == [200]
    assert [r.status_code for r in answers] == [429] * 7
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded" for r in answers)


def test_requests_refused_or_answered_without_the_engine_give_their_place_back(narrow: ServerProcess) -> None:
    """A place is taken as soon as a body is read (before parsing, so the refusals of a burst go first); every
    request that ends before the engine gives it back. With one place in all, a leak would make the last 429."""
    bodies: list[dict | bytes] = [{"prompt": "x", "temperature": -1}, {"prompt": "x", "n": 2}, {"prompt": 5.5},
                                  {"prompt": "x", "max_tokens": 0, "echo": True}, b"{not json"]
    for body in bodies * 3:
        r = (httpx.post(narrow.url + "/v1/completions", content=body, timeout=60,
                        headers={"content-type": "application/json"}) if isinstance(body, bytes)
             else post(narrow.url, body))
        assert r.status_code in (200, 400), r.text
    assert post(narrow.url, {"prompt": "the", "max_tokens": 3}).status_code == 200


def test_admission_counts_every_choice_as_one_engine_request(serve_artifact) -> None:
    """Capacity 2 (one running, one queued): with one stream held, n = 1 is admitted beside it and n = 2 is
    refused at once (429, Retry-After); once the stream is done, n = 2 is served.

    The engine is frozen while the places are counted, so nothing finishes meanwhile however fast it is.
    """
    s = ServerProcess(serve_artifact, "--max-batch-size", "1", "--max-queue", "1")
    try:
        assert post(s.url, {"prompt": "x", "n": 3}).json()["error"]["param"] == "n"  # could never fit: 400
        slow = {"prompt": "the", "max_tokens": 505, "ignore_eos": True, "logprobs": 20, "presence_penalty": 0.1}
        held: list[int] = []
        holder = threading.Thread(target=lambda: held.append(post(s.url, slow).status_code))
        cancelled = metric(s.url, "nextoken_requests_total", outcome="cancelled")
        body = json.dumps({"prompt": "x", "n": 1, "max_tokens": 1}).encode()
        with s.engine_frozen():
            holder.start()
            with socket.create_connection(("127.0.0.1", s.port)) as sock:  # n = 1 beside the held stream
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                s.wait_until_full()  # both admitted: n = 1 was not refused
            deadline = time.monotonic() + 10  # its client left: its place is given back, the held one stays
            while metric(s.url, "nextoken_requests_total", outcome="cancelled") == cancelled:
                assert time.monotonic() < deadline, "the abandoned request never gave its place back"
                time.sleep(0.02)
            refused = post(s.url, {"prompt": "x", "n": 2, "max_tokens": 1})  # one place left: n = 2 does not fit
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "overloaded"
        holder.join(60)
        assert held == [200]
        r = post(s.url, {"prompt": "x", "n": 2, "max_tokens": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
    finally:
        s.stop()


def test_disconnect_frees_the_slot(narrow: ServerProcess) -> None:
    """A stream whose client hangs up after its first event is cancelled and its slot freed."""
    gone = narrow.abandon_stream({"prompt": "the", "max_tokens": 500, "ignore_eos": True})
    assert post(narrow.url, {"prompt": "the", "max_tokens": 3}).status_code == 200  # the only slot is free again
    # the abandoned stream stopped early: far fewer than its 500 tokens were generated
    assert metric(narrow.url, "nextoken_generation_tokens_total") - gone.generated_before < 3 + 500


def test_non_streaming_disconnect_frees_the_slot(narrow: ServerProcess) -> None:
    """A client that gives up on a non-streaming request stops its generation too (LitServe never noticed).

    The engine is frozen while the client comes and goes, so the request cannot finish first however
    slow the machine is: what ends it can only be the hang-up.
    """
    generated = metric(narrow.url, "nextoken_generation_tokens_total")
    cancelled = metric(narrow.url, "nextoken_requests_total", outcome="cancelled")
    body = json.dumps({"prompt": "the", "max_tokens": 500, "ignore_eos": True}).encode()
    with narrow.engine_frozen():
        with socket.create_connection(("127.0.0.1", narrow.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            narrow.wait_until_full()  # it holds the only place; then the client hangs up
        deadline = time.monotonic() + 30
        while metric(narrow.url, "nextoken_requests_total", outcome="cancelled") == cancelled:
            assert time.monotonic() < deadline, "the abandoned request was never cancelled"
            time.sleep(0.02)
    assert post(narrow.url, {"prompt": "the", "max_tokens": 3}).status_code == 200  # the only place is free
    assert metric(narrow.url, "nextoken_generation_tokens_total") - generated < 3 + 500


def test_a_queued_stream_whose_client_left_gives_up_its_place(serve_artifact) -> None:
    """A streaming request waiting for a slot is cancelled when its client leaves, before it costs a token.

    With the engine frozen, 16 long requests fill the 8 slots and 8 queue places and the stream
    under test takes the 17th place (the next request is refused), so it is queued behind 8 whole
    generations when its client leaves, however fast the engine.
    """
    s = ServerProcess(serve_artifact, "--max-batch-size", "8", "--max-queue", "9")
    try:
        long = {"prompt": "the", "max_tokens": 505, "ignore_eos": True, "logprobs": 20, "presence_penalty": 0.1}
        generated = metric(s.url, "nextoken_generation_tokens_total")
        cancelled = metric(s.url, "nextoken_requests_total", outcome="cancelled")
        threads = [threading.Thread(target=post, args=(s.url, long)) for _ in range(16)]
        with s.engine_frozen():
            for t in threads:
                t.start()
            body = json.dumps({"prompt": "x", "max_tokens": 5, "stream": True}).encode()
            with socket.create_connection(("127.0.0.1", s.port)) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                s.wait_until_full()  # all 17 admitted: the stream is queued
            deadline = time.monotonic() + 10
            while metric(s.url, "nextoken_requests_total", outcome="cancelled") == cancelled:
                assert time.monotonic() < deadline, "the queued request was never cancelled"
                time.sleep(0.02)
        for t in threads:
            t.join()
        # Before: it waited for a slot, was prefilled, and only then noticed nobody was listening.
        assert metric(s.url, "nextoken_generation_tokens_total") - generated == 16 * 505
    finally:
        s.stop()


def test_api_key(serve_artifact) -> None:
    s = ServerProcess(serve_artifact, "--api-key-env", "NT_TEST_KEY", env={"NT_TEST_KEY": "sekret"})
    try:
        for probe in ("/health", "/ready"):  # open: Kubernetes probes and load balancers send no key
            assert httpx.get(s.url + probe).status_code == 200
        for path in ("/v1/models", "/metrics", "/litserve/info", "/openapi.json", "/redoc", "/tokenizer_info"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        # /docs is a static page, like the playground (a browser cannot attach the key to a page load): it
        # holds nothing of the API and asks for the key before it reads /openapi.json, which needs it.
        docs = httpx.get(s.url + "/docs")
        assert docs.status_code == 200 and "/ui/docs.js" in docs.text and "/v1/completions" not in docs.text
        for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
            assert post(s.url, body, path).status_code == 401
            assert post(s.url, body, path, headers={"Authorization": "Bearer sekret"}).status_code == 200
        r = post(s.url, {"prompt": "x", "max_tokens": 1}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        ok = post(s.url, {"prompt": "x", "max_tokens": 1}, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
    finally:
        s.stop()


def _refused_while_draining(url: str) -> None:
    """A request that arrives during the drain: a whole HTTP 503 with Retry-After and the error body."""
    r = post(url, {"prompt": "x", "max_tokens": 1}, timeout=30)  # a reset connection raises here
    assert r.status_code == 503 and r.headers["retry-after"] == "1", (r.status_code, r.headers, r.text)
    assert r.json()["error"]["code"] == "unavailable" and r.json()["error"]["type"] == "server_error"


@pytest.mark.parametrize("how", ["SIGTERM to the main process", "SIGINT to the process group (Ctrl-C)"])
def test_a_signal_drains_in_flight_streams_then_exits(serve_artifact, how: str) -> None:
    """Stop admitting (503), finish every stream whole (queued ones too), exit 0 with every process gone.

    A terminal's Ctrl-C signals every process of the group: the worker used to die of
    KeyboardInterrupt and the streams were cut. The signal comes once all 12 streams are admitted
    (a 13th request is refused with 429: one slot + a queue of 11), with the engine frozen, so the
    checks below run mid-drain however fast the engine is; then the engine goes on and every
    stream finishes.
    """
    n, new = 12, 400
    s = ServerProcess(serve_artifact, "--max-batch-size", "1", "--max-queue", str(n - 1))
    try:
        body = {"prompt": "the", "max_tokens": new, "ignore_eos": True, "logprobs": 20, "stream": True}
        chunks: list[list] = [[] for _ in range(n)]

        def consume(i: int) -> None:
            with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        chunks[i].append(line[len("data: "):])

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(n)]
        with s.engine_frozen():
            for t in threads:
                t.start()
            s.wait_until_full()  # all 12 admitted, none can finish
            assert len(s.group_pids()) >= 3  # main, API server, inference worker (+ LitServe's manager)
            if how.startswith("SIGTERM"):
                s.proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(s.proc.pid, signal.SIGINT)
            deadline = time.monotonic() + 5
            while httpx.get(s.url + "/ready").status_code != 503:  # readiness turns 503; liveness stays 200
                assert time.monotonic() < deadline
            assert httpx.get(s.url + "/health").json()["status"] == "draining"
            # New requests during the drain, one by one and eight at once: each a whole 503, none a reset.
            for _ in range(3):
                _refused_while_draining(s.url)
            with ThreadPoolExecutor(8) as pool:  # an assertion in a thread is raised here, by result()
                for f in [pool.submit(_refused_while_draining, s.url) for _ in range(8)]:
                    f.result()
            assert all(t.is_alive() for t in threads) and s.proc.poll() is None  # all of it during the drain
        for t in threads:
            t.join(120)
        for c in chunks:
            assert c and c[-1] == "[DONE]"
            assert sum(len(json.loads(x)["choices"][0]["token_ids"]) for x in c[:-1]) == new  # finished whole
        assert s.proc.wait(30) == 0
        deadline = time.monotonic() + 10
        while s.group_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.group_pids() == []  # every process the server started is gone
    finally:
        s.stop()


def test_a_dead_worker_fails_in_flight_streams_and_the_server_exits_1(serve_artifact) -> None:
    """Stock LitServe left the stream open until uvicorn was killed 30 s later, then exited 0."""
    s = ServerProcess(serve_artifact)
    try:
        worker = s.engine_pid()
        chunks: list = []
        t0 = time.monotonic()
        with httpx.stream("POST", s.url + "/v1/completions", timeout=30,
                          json={"prompt": "the", "max_tokens": 480, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    if not chunks:
                        os.kill(worker, signal.SIGKILL)  # mid-stream: hundreds of tokens still to come
                    chunks.append(line[len("data: "):])
        assert time.monotonic() - t0 < 10
        assert json.loads(chunks[-1])["error"]["code"] == "internal_error"
        assert sum(len(json.loads(c)["choices"][0]["token_ids"]) for c in chunks[:-1]) < 480
        assert s.proc.wait(30) == 1
        deadline = time.monotonic() + 10
        while s.group_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert s.group_pids() == []
    finally:
        s.stop()


def test_idle_server_uses_almost_no_cpu(server: ServerProcess) -> None:
    import psutil

    procs = [psutil.Process(p) for p in server.group_pids()]
    before = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
    time.sleep(2.0)
    after = sum(p.cpu_times().user + p.cpu_times().system for p in procs)
    assert (after - before) / 2.0 < 0.05  # under 5% of one core (LitServe's stock loop spins a whole core)
    # LitServe's stock loop holds a request that arrives at an idle worker for up to 1 s; five in a
    # row, each after an idle pause, would almost surely hit that at least once.
    for _ in range(5):
        time.sleep(0.3)
        t0 = time.perf_counter()
        assert post(server.url, {"prompt": "the", "max_tokens": 1}).status_code == 200
        assert time.perf_counter() - t0 < 0.5
