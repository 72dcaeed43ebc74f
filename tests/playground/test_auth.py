"""The playground on a server started with --api-key-env: pages load, data needs the key, the key stays in the tab."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess

# The first test to use them builds the session's model (train + export): minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
KEY = "pg-secret-key"


@pytest.fixture(scope="module")
def key_server(pg_artifact: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(pg_artifact, "--api-key-env", "PG_TEST_KEY", env={"PG_TEST_KEY": KEY})
    yield s
    s.stop()


def test_pages_load_without_the_key_and_every_data_route_needs_it(key_server) -> None:
    url = key_server.url
    for path in ("/", "/runs", "/docs", "/ui/playground.js", "/ui/docs.js", "/ui/common.js", "/ui/style.css"):
        assert httpx.get(url + path).status_code == 200, path  # a browser cannot attach the key to a page load
    assert httpx.get(url + "/api/auth").json() == {"api_key_required": True}
    for path in ("/api/model", "/api/runs", "/api/runs/served", "/v1/models", "/metrics", "/openapi.json"):
        assert httpx.get(url + path).status_code == 401, path
        assert httpx.get(url + path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200, path
    r = httpx.post(url + "/api/runs/served/attention", json={"text": "the"})
    assert r.status_code == 401


def test_the_page_asks_for_the_key_and_keeps_it_in_this_tab_only(key_server, open_page, browser) -> None:
    url = key_server.url
    page, watch = open_page(url + "/")
    assert page.is_visible("#key-box") and page.inner_text("#key-note") == "this server needs an API key"
    assert page.evaluate("() => document.activeElement.id") == "api-key"
    assert page.locator("#model-facts dd").count() == 0
    assert watch.messages == []  # nothing was sent without a key (no 401 logged)

    watch.allow(r"status of 401", times=None)  # what a wrong key gets
    page.fill("#api-key", "wrong")
    page.press("#api-key", "Enter")
    page.wait_for_selector('#key-note:text-is("the server refused this key (401)")')
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector('#model-facts dd[data-fact="name"]:text-is("pg")')
    page.fill("#prompt", "the")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "8")
    page.click("#generate")
    page.wait_for_selector("#gen-status[data-finish]")
    assert page.get_attribute("#gen-status", "data-finish") in ("length", "stop")
    assert page.locator("#output .chip").count() >= 1
    assert page.evaluate("() => sessionStorage.getItem('nextoken.apiKey')") == KEY
    assert page.evaluate("() => [localStorage.length, document.cookie]") == [0, ""]  # nowhere that outlives the tab

    page.goto(url + "/runs")  # the same tab keeps it
    page.wait_for_selector("body[data-ready]")
    page.wait_for_selector("svg.chart")
    assert page.is_hidden("#run-status")

    other, other_watch = open_page(url + "/")  # another tab (a fresh context) does not have it
    assert other.evaluate("() => sessionStorage.getItem('nextoken.apiKey')") is None
    assert other.is_visible("#key-box") and other.input_value("#api-key") == ""
    assert other_watch.messages == []


def test_docs_loads_without_the_key_then_asks_for_it(key_server, open_page) -> None:
    """Like the playground: the page is public, the API description (/openapi.json) needs the key."""
    url = key_server.url
    page, watch = open_page(url + "/docs")
    assert page.is_visible("#key-box") and page.inner_text("#key-note") == "this server needs an API key"
    assert "needs it" in page.inner_text("#docs-status") and page.locator("#operations section").count() == 0
    assert watch.messages == []  # nothing was asked for without a key (no 401 logged)

    watch.allow(r"status of 401", times=None)  # what a wrong key gets
    page.fill("#api-key", "wrong")
    page.press("#api-key", "Enter")
    page.wait_for_selector('#key-note:text-is("the server refused this key (401)")')
    assert "401" not in page.inner_text("#operations") and page.locator("#operations section").count() == 0
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#operations[data-loaded]")
    paths = httpx.get(url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()["paths"]
    shown = page.locator("#operations section[data-path]").evaluate_all("els => els.map(e => e.dataset.path)")
    assert set(shown) == set(paths) and page.is_hidden("#docs-status")
    assert page.locator('section[data-path="/v1/completions"] tr[data-field="max_tokens"]').count() == 1
