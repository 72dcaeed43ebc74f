"""The playground's Chat tab in chromium against a real `nextoken serve --chat-template`.

What the page shows is checked against the API's own answer to the request the page sent (seeded,
so it is reproducible), taken from the browser's request log; Stop is checked in the server's /metrics.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, metric
from tests.playground import helpers as ui

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def chat_server(pg_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The playground's model (4096-token context: long replies) chatting with a template the test wrote."""
    with ui.chat_server(pg_artifact, tmp_path_factory.mktemp("chat"), "--max-batch-size", "4") as server:
        yield server


def _api_twin(url: str, sent: dict) -> dict:
    """The page's chat request sent again, without streaming: the API's own answer."""
    body = {k: v for k, v in sent.items() if k != "stream_options"} | {"stream": False}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _roles(page: object) -> list[str]:
    return page.locator("#chat-log .turn .role").all_text_contents()


def _said(chips: list[dict[str, str]]) -> str:
    """A char model's reply text from its tokens: the content the API reports (end-of-text is not text)."""
    return "".join(c["token"] for c in chips if c["token"] != "<|endoftext|>")


def _assert_chips_are(chips: list[dict[str, str]], content: list[dict]) -> None:
    assert [c["token"] for c in chips] == [e["token"] for e in content]
    for c, e in zip(chips, content, strict=True):
        assert float(c["p"]) == pytest.approx(math.exp(e["logprob"]), rel=1e-12)  # the shade's probability


def test_the_chat_tab_is_offered_only_for_a_model_with_a_template(pg_server, chat_server, open_page) -> None:
    base = httpx.get(pg_server.url + "/v1/models", timeout=10).json()["data"][0]
    assert base["chat_template"] == "nextoken default"  # a base model: the server's fallback template only
    page, _ = open_page(pg_server.url + "/")
    assert page.locator("[role=tab]:visible").all_inner_texts() == ["Generate", "Score text"]
    page.focus("#tab-generate")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")  # the arrows cycle through the tabs shown, skipping the hidden one
    assert page.evaluate("() => document.activeElement.id") == "tab-generate" and page.is_visible("#panel-generate")

    assert httpx.get(chat_server.url + "/v1/models", timeout=10).json()["data"][0]["chat_template"] == "--chat-template"
    chat, _ = open_page(chat_server.url + "/")
    assert chat.locator("[role=tab]:visible").all_inner_texts() == ["Generate", "Chat", "Score text"]
    chat.focus("#tab-generate")
    chat.keyboard.press("ArrowRight")
    assert chat.is_visible("#panel-chat") and chat.is_hidden("#panel-generate")
    assert chat.get_attribute("#tab-chat", "aria-selected") == "true"
    # One set of Sampling controls, under the shown panel: the keyboard reaches it after Chat's buttons.
    assert chat.locator("#sampling").count() == 1 and chat.locator("#panel-chat #sampling").is_visible()
    chat.focus("#chat-input")
    order = []
    for _ in range(3):
        chat.keyboard.press("Tab")
        order.append(chat.evaluate("() => document.activeElement.id"))
    assert order == ["chat-send", "chat-new", "temperature"], order  # Stop is disabled while nothing runs
    chat.click("#tab-generate")
    assert chat.locator("#panel-generate #sampling").is_visible()


def test_a_reply_streams_as_the_apis_chips_and_goes_back_as_text(chat_server, open_page, shots) -> None:
    url = chat_server.url
    page, _ = open_page(url + "/")
    sent = ui.record_posts(page, "/v1/chat/completions")
    page.click("#tab-chat")
    page.fill("#chat-system", "be brief")
    ui.set_controls(page, temperature=1, top_k=0, top_p=1, max_tokens=24, seed=7, logprobs=4)
    page.fill("#chat-input", "hello there")
    page.focus("#chat-input")
    page.keyboard.press("Control+Enter")
    assert ui.finish(page, "#chat-status") in ("length", "stop")
    assert len(sent) == 1 and json.loads(page.text_content("#chat-request-json")) == sent[0]  # shown = sent
    first = sent[0]
    assert first["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    assert first["seed"] == 7 and first["logprobs"] is True and first["top_logprobs"] == 4 and first["stream"]
    choice = _api_twin(url, first)
    content = choice["logprobs"]["content"]
    _assert_chips_are(ui.chips(page, "#chat-log"), content)
    reply = choice["message"]["content"]
    assert reply == _said(ui.chips(page, "#chat-log")) and reply
    assert _roles(page) == ["user", "assistant"] and page.inner_text("#chat-log .user .said") == "hello there"
    status = page.inner_text("#chat-status")
    assert status.startswith(f"done: {len(content)} tokens in ") and " tok/s)" in status
    assert status.endswith(f"finish: {choice['finish_reason']}")

    i = 2
    page.click(f'#chat-log .chip[data-i="{i}"]')  # the alternatives panel, as for Generate
    want = content[i]["top_logprobs"]
    shown = ui.bars(page)
    assert [b["token"] for b in shown[:len(want)]] == [t["token"] for t in want]
    for b, t in zip(shown, want, strict=False):
        assert b["p"] == pytest.approx(math.exp(t["logprob"]), rel=1e-12)
    assert page.inner_text("#detail-title") == f"Token {i + 1} of {len(content)}"

    page.fill("#chat-input", "and then?")
    ui.set_controls(page, seed=8)  # another reply than the first, whatever the model learnt
    page.click("#chat-send")
    assert ui.finish(page, "#chat-status") in ("length", "stop")
    second = sent[1]
    assert second["messages"] == first["messages"] + [{"role": "assistant", "content": reply},
                                                      {"role": "user", "content": "and then?"}]
    content2 = _api_twin(url, second)["logprobs"]["content"]
    _assert_chips_are(ui.chips(page, "#chat-log"), content + content2)  # the first reply stays as chips
    assert _roles(page) == ["user", "assistant", "user", "assistant"]
    page.focus(f'#chat-log .chip[data-i="{len(content)}"]')  # the second reply's first token
    assert page.inner_text("#detail-title") == f"Token 1 of {len(content2)}"
    page.keyboard.press("ArrowLeft")  # the keyboard walks back into the first reply
    assert page.inner_text("#detail-title") == f"Token {len(content)} of {len(content)}"
    page.screenshot(path=str(shots / "chat.png"), full_page=True)

    page.click("#chat-new")
    assert _roles(page) == [] and page.inner_text("#chat-status") == ""
    page.fill("#chat-input", "again")
    page.click("#chat-send")
    ui.finish(page, "#chat-status")
    assert sent[2]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "again"}]


def test_stop_cancels_the_reply_and_keeps_what_was_said(chat_server, open_page) -> None:
    url = chat_server.url
    page, _ = open_page(url + "/")
    sent = ui.record_posts(page, "/v1/chat/completions")
    cancelled = metric(url, "nextoken_requests_total", outcome="cancelled")
    page.click("#tab-chat")
    ui.set_controls(page, temperature=0, max_tokens=4000, logprobs=2)
    page.check("#ignore_eos")  # 4000 tokens whatever the model predicts: seconds of streaming
    page.fill("#chat-input", "talk")
    page.evaluate(ui.arrivals("#chat-log"))
    page.click("#chat-send")
    # Streaming: chips have arrived in at least two DOM updates (or the reply ended, which fails below).
    page.wait_for_function("() => new Set(window.__arrivals.filter(([, n]) => n > 0).map(([, n]) => n)).size >= 2"
                           " || document.querySelector('#chat-status[data-finish]')")
    assert page.get_attribute("#chat-status", "data-finish") is None, page.inner_text("#chat-status")
    with chat_server.engine_frozen():  # the stream cannot end by itself before Stop
        assert metric(url, "nextoken_requests_running") == 1
        page.keyboard.press("Escape")
        assert ui.finish(page, "#chat-status") == "stopped"
        stopped_at = len(ui.chips(page, "#chat-log"))
        assert 0 < stopped_at < 4000
    deadline = time.monotonic() + 10
    while metric(url, "nextoken_requests_running") != 0:
        assert time.monotonic() < deadline, "the running gauge did not drop after Stop"
        time.sleep(0.05)
    assert metric(url, "nextoken_requests_total", outcome="cancelled") == cancelled + 1
    assert len(ui.chips(page, "#chat-log")) == stopped_at  # nothing arrived after Stop
    assert page.inner_text("#chat-status") == f"stopped after {stopped_at} tokens"
    assert page.is_enabled("#chat-send") and page.is_disabled("#chat-stop") and page.is_enabled("#generate")
    # The partial reply is part of the conversation: the next turn sends it back.
    partial = _said(ui.chips(page, "#chat-log"))
    ui.set_controls(page, max_tokens=3)
    page.uncheck("#ignore_eos")
    page.fill("#chat-input", "go on")
    page.click("#chat-send")
    ui.finish(page, "#chat-status")
    assert sent[1]["messages"][1] == {"role": "assistant", "content": partial}


def test_a_refused_turn_shows_the_servers_message_and_is_taken_back(chat_server, open_page) -> None:
    page, watch = open_page(chat_server.url + "/")
    watch.allow(r"status of 400")  # chromium logs the server's refusal
    sent = ui.record_posts(page, "/v1/chat/completions")
    page.click("#tab-chat")
    ui.set_controls(page, temperature=3)
    page.fill("#chat-input", "hi")
    page.click("#chat-send")
    assert ui.finish(page, "#chat-status") == "error"
    r = httpx.post(chat_server.url + "/v1/chat/completions", json=sent[0], timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert page.inner_text("#chat-status") == f"error 400: {r.json()['error']['message']}"
    assert page.get_attribute("#temperature", "aria-invalid") is not None
    assert page.locator("#chat-log .turn").count() == 0 and page.input_value("#chat-input") == "hi"
