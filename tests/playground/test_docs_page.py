"""/docs in chromium against a real `nextoken serve`: the API page comes from this server alone and shows
what /openapi.json says.

FastAPI's Swagger UI (and ReDoc) loaded their scripts from a CDN, so /docs was blank offline; the
page is now a static file of ours drawing /openapi.json. Each check compares the page with the
document fetched independently (httpx), so a field left out, a constraint misstated or a response
missing fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import pytest

from nextoken.serve.http.playground import CSP
from tests.browser_fixtures import PHONE

# The first test to use them builds the session's model (train + export): minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ABSOLUTE_URL = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://|//[a-z0-9-]+(\.[a-z0-9-]+)+")  # scheme:// or //host.name
IMPORT = re.compile(r"""(?:from|import)\s*["'](/ui/[^"']+)["']""")


def _document(url: str) -> dict:
    r = httpx.get(url + "/openapi.json", timeout=30)
    assert r.status_code == 200
    return r.json()


def _operations(doc: dict) -> list[tuple[str, str, dict]]:
    return [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()]


def _record(seen: list[str]) -> Callable[[object], None]:
    """``open_page``'s ``before``: every request the page makes, from its first on, goes into ``seen``."""
    return lambda page: page.on("request", lambda r: seen.append(r.url))


def test_docs_html_and_its_scripts_name_no_other_server(pg_server) -> None:
    """Fails on FastAPI's Swagger page: its HTML loads swagger-ui from cdn.jsdelivr.net."""
    r = httpx.get(pg_server.url + "/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert ABSOLUTE_URL.search(r.text) is None and "cdn" not in r.text.lower(), ABSOLUTE_URL.search(r.text)
    assert r.headers.get("content-security-policy") == CSP  # even a URL slipped in could not load
    assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert assets and all(a.startswith(("/ui/", "/", "#", "data:")) and not a.startswith("//") for a in assets), assets
    todo, read = [a for a in assets if a.endswith(".js")], set()
    while todo:  # the page's modules and everything they import
        path = todo.pop()
        if path in read:
            continue
        read.add(path)
        js = httpx.get(pg_server.url + path)
        assert js.status_code == 200, path
        assert ABSOLUTE_URL.search(js.text) is None, (path, ABSOLUTE_URL.search(js.text))
        todo += IMPORT.findall(js.text)
    assert {"/ui/docs.js", "/ui/common.js", "/ui/openapi.js"} <= read
    for gone in ("/redoc", "/docs/oauth2-redirect"):  # FastAPI's other CDN pages are not served either
        assert httpx.get(pg_server.url + gone).status_code == 404, gone


def test_docs_renders_every_operation_with_no_request_leaving_the_server(pg_server, open_page) -> None:
    url = pg_server.url
    doc = _document(url)
    seen: list[str] = []
    page, _ = open_page(url + "/docs", before=_record(seen))
    page.wait_for_selector("#operations[data-loaded]")
    ops = _operations(doc)
    assert {"/v1/completions", "/v1/chat/completions", "/tokenize", "/metrics"} <= {p for p, _, _ in ops}
    assert page.locator("#toc li").count() == len(ops) == int(page.get_attribute("#operations", "data-loaded"))
    schemas = doc["components"]["schemas"]
    for path, method, op in ops:
        card = page.locator(f'#operations section[data-path="{path}"][data-method="{method}"]')
        assert card.count() == 1, (method, path)
        assert card.locator("h3").inner_text() == f"{method.upper()} {path}"
        assert op["summary"] in card.inner_text()
        for status, resp in op["responses"].items():  # every response: its status and its description
            row = card.locator(f'tr[data-status="{status}"]')
            assert row.count() == 1 and resp["description"].replace("`", "") in row.inner_text(), (path, status)
        body = (op.get("requestBody") or {}).get("content", {}).get("application/json", {}).get("schema")
        shapes = (body.get("anyOf") or [body]) if body else []
        for shape in shapes:  # every field of every body it takes, marked required exactly when it is
            model = schemas[shape["$ref"].rsplit("/", 1)[1]]
            table = card.locator("table.fields").nth(shapes.index(shape))
            for name in model["properties"]:
                row = table.locator(f':scope > tbody > tr[data-field="{name}"]')
                assert row.count() == 1, (path, name)
                assert (row.locator(".req").count() == 1) == (name in model.get("required", [])), (path, name)

    # Constraints as the document states them (the served model's limits written in), read from the document.
    completion = page.locator('section[data-path="/v1/completions"]')
    props = schemas["CompletionRequest"]["properties"]

    def rules(field: str) -> str:
        return completion.locator(f'tr[data-field="{field}"] .rules').inner_text()

    most = props["max_tokens"]["anyOf"][0]
    assert rules("max_tokens") == f"≥ {most['minimum']}, ≤ {most['maximum']}"
    assert rules("temperature") == "≥ 0, ≤ 2"
    assert rules("n") == f"≥ 1, ≤ {props['n']['anyOf'][0]['maximum']}"
    assert rules("seed") == "≥ -9223372036854775808, ≤ 18446744073709551615"  # every digit, past 2^53
    assert "Context here:" in completion.locator('tr[data-field="max_tokens"] .desc').inner_text()
    assert completion.locator('tr[data-field="max_tokens"] .type').inner_text() == "integer | null"

    # A nested object is readable in place: the chat messages' own fields, with the roles allowed.
    chat = page.locator('section[data-path="/v1/chat/completions"]')
    nested = chat.locator('tr[data-nested-of="messages"] details[data-schema="ChatMessage"]')
    assert not nested.locator('tr[data-field="role"]').is_visible()
    nested.locator(":scope > summary").click()
    role = nested.locator(':scope > table > tbody > tr[data-field="role"]')
    roles = schemas["ChatMessage"]["properties"]["role"]["enum"]
    assert role.is_visible() and role.locator(".rules").inner_text() == "one of " + ", ".join(f'"{r}"' for r in roles)
    assert page.locator("#schemas section[data-schema]").count() == len(schemas)  # response types, linked to

    phone, _ = open_page(url + "/docs#op-post-v1-chat-completions", PHONE, before=_record(seen))
    phone.wait_for_selector("#operations[data-loaded]")
    assert phone.evaluate("() => document.documentElement.scrollWidth <= innerWidth")  # no sideways scrolling
    assert {u.split("?")[0] for u in seen} >= {url + "/docs", url + "/ui/docs.js", url + "/openapi.json"}
    assert [u for u in seen if not u.startswith(url + "/")] == []  # nothing from anywhere but this server
