"""The playground's defaults fit the model: its generation_config's sampling settings, and max tokens
clamped to what the prompt leaves of a small context.

The server is the session's tiny model (a 32-token context) with a chat template, so both Generate
and Chat meet the limit; every count the page acts on is checked against the server's own /tokenize.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, republish
from tests.playground import helpers as ui

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PAGE_MAX_TOKENS = 64  # index.html's default, refused by a small model before the clamp
# what the model's creator recommends (generation_config.json); index.html's own are 0.8 and 50
MODEL_SAMPLING = {"temperature": 0.6, "top_k": 20}


@pytest.fixture(scope="module")
def small_server(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("small")
    artifact = republish(tiny_artifact, folder / "tiny", json_edits={"generation_config.json": MODEL_SAMPLING})
    with ui.chat_server(artifact, folder) as server:
        yield server


@pytest.fixture
def context(small_server: ServerProcess) -> int:
    card = httpx.get(small_server.url + "/v1/models", timeout=10).json()["data"][0]
    assert card["max_model_len"] == card["context_length"] == 32  # tests/conftest.py's train_tiny block_size
    return card["max_model_len"]


def _count(url: str, body: dict) -> int:
    r = httpx.post(url + "/tokenize", json=body, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def test_the_first_generate_with_the_pages_defaults_succeeds(small_server, context, open_page) -> None:
    url = small_server.url
    page, _ = open_page(url + "/")
    sent = ui.record_posts(page, "/v1/completions")
    prompt = page.input_value("#prompt")
    old = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": PAGE_MAX_TOKENS}, timeout=30)
    assert old.status_code == 400 and old.json()["error"]["param"] == "max_tokens"  # the bug this fixes
    assert page.get_attribute("#max_tokens", "max") == str(context)
    assert page.input_value("#max_tokens") == str(context // 2)  # the default lowered to half the context
    card = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
    assert card["default_sampling_params"] == MODEL_SAMPLING | {"top_p": 1.0}
    assert [page.input_value(f"#{k}") for k in ("temperature", "top_k", "top_p")] == ["0.6", "20", "1"]
    page.click("#generate")
    assert ui.finish(page) in ("length", "stop")
    assert sent[0]["max_tokens"] == context // 2 and sent[0]["prompt"] == prompt
    assert (sent[0]["temperature"], sent[0]["top_k"], sent[0]["top_p"]) == (0.6, 20, 1)
    assert _count(url, {"prompt": prompt}) + sent[0]["max_tokens"] <= context
    assert page.locator("#output .chip").count() > 0


def test_max_tokens_is_lowered_to_what_the_prompt_leaves(small_server, context, open_page) -> None:
    url = small_server.url
    page, _ = open_page(url + "/")
    sent = ui.record_posts(page, "/v1/completions")
    prompt = "the cat sat on the mat"
    room = context - _count(url, {"prompt": prompt})
    assert 0 < room < 30
    page.fill("#prompt", prompt)
    ui.set_controls(page, max_tokens=30, temperature=0)
    page.click("#generate")
    assert ui.finish(page) in ("length", "stop")
    assert sent[0]["max_tokens"] == room
    note = f" · max tokens lowered to {room} to fit the {context}-token context"
    assert page.inner_text("#gen-status").endswith(note)
    assert page.input_value("#max_tokens") == "30"  # the request is fitted, the user's setting kept
    n = page.locator("#output .chip").count()
    assert n == room if page.get_attribute("#gen-status", "data-finish") == "length" else 0 < n <= room


def test_a_prompt_that_fills_the_context_is_not_sent(small_server, context, open_page) -> None:
    url = small_server.url
    page, _ = open_page(url + "/")
    sent = ui.record_posts(page, "/v1/completions")
    prompt = "the cat sat on the mat. the dog lay on the rug."
    count = _count(url, {"prompt": prompt})
    assert count >= context
    page.fill("#prompt", prompt)
    page.click("#generate")
    assert ui.finish(page) == "error"
    assert page.inner_text("#gen-status") == (f"error: the prompt is {count} tokens long: it fills this model's "
                                              f"{context}-token context, leaving no room for a reply; shorten it")
    assert page.get_attribute("#prompt", "aria-invalid") is not None
    assert sent == [] and page.is_enabled("#generate")


def test_a_chat_turn_is_fitted_to_the_context(small_server, context, open_page) -> None:
    url = small_server.url
    page, _ = open_page(url + "/")
    sent = ui.record_posts(page, "/v1/chat/completions")
    page.click("#tab-chat")
    page.fill("#chat-input", "hi")
    room = context - _count(url, {"messages": [{"role": "user", "content": "hi"}]})
    assert 0 < room < context // 2  # the template's markers take more than half of this context
    page.click("#chat-send")
    assert ui.finish(page, "#chat-status") in ("length", "stop")
    assert sent[0]["max_tokens"] == room
    assert page.inner_text("#chat-status").endswith(f"max tokens lowered to {room} to fit the {context}-token context")

    page.fill("#chat-input", "and now a message far too long for this context")
    page.click("#chat-send")
    assert ui.finish(page, "#chat-status") == "error"
    assert "fills this model's 32-token context" in page.inner_text("#chat-status")
    assert page.get_attribute("#chat-input", "aria-invalid") is not None
    assert len(sent) == 1 and page.locator("#chat-log .turn").count() == 2  # the refused turn was taken back
    assert page.input_value("#chat-input") == "and now a message far too long for this context"  # to edit
