"""Browser tests' fixtures: Playwright for Python driving Debian's chromium against real servers on loopback.

Loaded for the whole suite by ``tests/conftest.py`` (``pytest_plugins``): the playground's tests
(``tests/playground``) and the run viewer's (``tests/nextoken``) share the browser and the model.

Playwright's own browser download is unreachable here, so the tests launch the system chromium
(``apt-get install chromium``; ``NEXTOKEN_CHROMIUM`` overrides the path) and skip when it or the
``playwright`` package is missing. Every page records console messages and uncaught errors; a
test fails on any error or warning it did not declare (``watch.allow``). Screenshots go to
``NEXTOKEN_TEST_ARTIFACTS`` when set (for CI to keep), else under pytest's temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import TINY_TEXT, ServerProcess, train_tiny

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str | None:
    path = os.environ.get("NEXTOKEN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return path if Path(path).is_file() else None


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the [test] extra)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (Debian package chromium; .ci/run installs it)")
    pw = sync_api.sync_playwright().start()
    # launch() gives every browser a fresh temporary profile (user-data dir), removed on close.
    b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
    yield b
    b.close()
    pw.stop()


class PageWatch:
    """Console errors/warnings and uncaught exceptions of one page; ``check`` fails on undeclared ones."""

    def __init__(self, page: object) -> None:
        self.messages: list[str] = []
        self.allowed: list[tuple[re.Pattern[str], int | None]] = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.messages.append(f"pageerror: {e}"))

    def _console(self, msg: object) -> None:
        if msg.type in ("error", "warning"):
            self.messages.append(f"console.{msg.type}: {msg.text}")

    def allow(self, pattern: str, *, times: int | None = 1) -> None:
        """Declare an expected message (e.g. the browser's log line for a 4xx the test provokes),
        ``times`` times or (None) any number of times."""
        self.allowed.append((re.compile(pattern), times))

    def check(self) -> None:
        unexpected = []
        budget = [[p, t] for p, t in self.allowed]
        for m in self.messages:
            hit = next((b for b in budget if b[0].search(m) and (b[1] is None or b[1] > 0)), None)
            if hit is None:
                unexpected.append(m)
            elif hit[1] is not None:
                hit[1] -= 1
        assert unexpected == [], f"console errors or page errors: {unexpected}"


@pytest.fixture
def open_page(browser: object) -> Iterator[object]:
    """``open_page(url, viewport=DESKTOP, before=None) -> (page, watch)`` in a fresh context (its own storage).

    ``before(page)`` runs before the page is loaded: to listen from its first request on."""
    opened = []

    def _open(url: str, viewport: dict[str, int] = DESKTOP,
              before: Callable[[object], None] | None = None) -> tuple[object, PageWatch]:
        context = browser.new_context(viewport=viewport)
        page = context.new_page()
        page.set_default_timeout(30_000)
        watch = PageWatch(page)
        opened.append((context, watch))
        if before is not None:
            before(page)
        page.goto(url)
        page.wait_for_selector("body[data-ready]")
        return page, watch

    yield _open
    for context, _ in opened:
        context.close()
    for _, watch in opened:
        watch.check()


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("NEXTOKEN_TEST_ARTIFACTS")
    d = Path(where) / "playground" if where else tmp_path_factory.mktemp("playground-screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def pg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A char model with a 4096-token context, barely trained: streams long enough (seconds) to press Stop
    in the middle of one and still see it running in /metrics, which answers slowly while a stream is hot."""
    corpus = tmp_path_factory.mktemp("pg-corpus")
    (corpus / "a.txt").write_text(TINY_TEXT * 10, encoding="utf-8")  # val split > the context
    (corpus / "b.txt").write_text(TINY_TEXT.upper() * 10, encoding="utf-8")
    run = tmp_path_factory.mktemp("pg-run") / "playground-run"
    train_tiny(run, corpus, block_size=4096, batch_size=1, max_iters=4, eval_interval=2, eval_iters=1, warmup_iters=1,
               n_embd=48, n_head=2, sample_tokens=24)
    return run


@pytest.fixture(scope="session")
def pg_artifact(tmp_path_factory: pytest.TempPathFactory, pg_run: Path) -> Path:
    from nextoken.export.build import export_run

    return export_run(pg_run, tmp_path_factory.mktemp("pg-art") / "pg", name="pg", version="1", log=None)


@pytest.fixture(scope="session")
def pg_server(pg_artifact: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(pg_artifact, "--max-batch-size", "4", "--max-queue", "8")
    yield s
    s.stop()


