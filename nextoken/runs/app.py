"""The run viewer's two apps: its own (``nextoken runs``) and a mount on the model server (``/runs``).

Both serve the page from ``static/`` here through the playground's ``StaticPages``, in front of
the API-key middleware (a page load cannot carry a key; the JSON routes stay behind it), and
reuse the playground's shared assets (``/ui/common.js``, ``/ui/style.css``). Nothing here starts
a server or loads a model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI

from nextoken.runs.routes import RunRoutes, find_runs
from nextoken.serve.http.middleware import ApiKeyMiddleware, install_openai_errors
from nextoken.serve.http.playground import STATIC_DIR as PLAYGROUND_STATIC_DIR
from nextoken.serve.http.playground import ServedModelView, StaticPages, source_run
from nextoken.serve.launcher import Mount

STATIC_DIR = Path(__file__).with_name("static")
STANDALONE_PAGES = {"/": "runs.html", "/runs": "runs.html"}
SERVED_PAGES = {"/runs": "runs.html"}


def build_app(paths: list[str], api_key: str | None = None) -> FastAPI:
    """The run page's app over ``paths`` (run folders or folders of runs), re-scanned per request."""
    folders = [Path(p) for p in paths]
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    install_openai_errors(app)
    RunRoutes(lambda: find_runs(folders), context="runs", threads=0).mount(app)
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    # Middleware added last sits outermost: the pages go after the key so they answer in front of it.
    app.add_middleware(StaticPages, api_key_required=api_key is not None, pages={},
                       static_dir=PLAYGROUND_STATIC_DIR)
    app.add_middleware(StaticPages, api_key_required=api_key is not None, pages=STANDALONE_PAGES,
                       static_dir=STATIC_DIR)
    return app


def served_run(*, api_key_required: bool) -> Mount:
    """The launcher's mount for ``/runs``: the served model's training run, when its folder is on this machine.

    The folder is the one the served version's manifest names, else the ``run/`` a published
    version carries (``source_run``), looked up per request, so a hot-reloaded version shows its own.
    """

    def mount(app: FastAPI, model: Callable[[], ServedModelView]) -> None:
        def runs() -> dict[str, Path]:
            run = source_run(Path(model().path))
            return {"served": run} if run is not None else {}

        RunRoutes(runs, context="served").mount(app)
        app.add_middleware(StaticPages, api_key_required=api_key_required, pages=SERVED_PAGES, static_dir=STATIC_DIR)

    return mount
