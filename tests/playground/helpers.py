"""What the playground's browser tests read from the page and set on it (Playwright's sync API)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import ServerProcess


def set_controls(page: object, **controls: object) -> None:
    for name, value in controls.items():
        page.fill(f"#{name}", str(value))


def finish(page: object, status: str = "#gen-status") -> str:
    """How the latest request ended, once it has: "stopped", "error" or the API's finish reason."""
    page.wait_for_selector(f"{status}[data-finish]")
    return page.get_attribute(status, "data-finish")


def chips(page: object, where: str = "#output") -> list[dict[str, str]]:
    return page.locator(f"{where} .chip").evaluate_all(
        "els => els.map(e => ({i: e.dataset.i, token: e.dataset.token, p: e.dataset.p, text: e.textContent}))")


def bars(page: object) -> list[dict[str, object]]:
    return page.locator("#detail-body .bar").evaluate_all(
        "els => els.map(e => ({token: e.dataset.token, p: Number(e.dataset.p), shown: e.querySelector('.val')"
        ".textContent, chosen: e.classList.contains('chosen')}))")


def record_posts(page: object, path: str) -> list[dict]:
    """The JSON bodies the page POSTs to ``path`` from now on, in order, from the browser's own request log."""
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data))
            if r.method == "POST" and r.url.split("?")[0].endswith(path) else None)
    return sent


def arrivals(where: str) -> str:
    """JS recording (time, chips so far) at each DOM change under ``where``: how tokens arrived."""
    return f"""() => {{
        window.__arrivals = [];
        const out = document.querySelector({json.dumps(where)});
        new MutationObserver(() => window.__arrivals.push([performance.now(), out.querySelectorAll('.chip').length]))
            .observe(out, {{childList: true, subtree: true}});
    }}"""


# A chat template in plain-text markers: the test models' char tokenizers have no ChatML tokens.
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@contextlib.contextmanager
def chat_server(artifact: Path, folder: Path, *flags: str) -> Iterator[ServerProcess]:
    """``nextoken serve artifact --chat-template FILE``: any model chats with CHAT_TEMPLATE; always stopped."""
    template = folder / "chat_template.jinja"
    template.write_text(CHAT_TEMPLATE, encoding="utf-8")
    server = ServerProcess(artifact, "--chat-template", str(template), *flags)
    try:
        yield server
    finally:
        server.stop()
