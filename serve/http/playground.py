"""The browser pages: the playground at ``/`` and the API page at ``/docs``, plus the small JSON routes
they read.

The pages are plain files in ``serve/http/static/`` (HTML, CSS, ES modules; no build step, nothing
from a CDN: the Content-Security-Policy sent with them allows this server only). Everything
the pages show comes from the public API (``/v1/completions`` and, in the Chat tab of a model with a
chat template, ``/v1/chat/completions``, both with ``logprobs``; ``/tokenize`` to fit max tokens into
the context; ``/v1/models``, ``/metrics``, ``/openapi.json``) and from two read-only routes added here:

* ``GET /api/model``: the served version's artifact described (parameters, layers, vocabulary,
  where it was exported from, parity figures), re-read when the served version changes;
* ``GET /api/auth``: whether the server wants an API key, so the page asks for one before
  sending a request that would be refused.

Auth: the static files and ``/api/auth`` hold nothing about the model and must load in a
browser that cannot attach ``Authorization`` headers to a page load, so ``StaticPages`` answers
them in front of the API-key middleware (``mount_playground`` must therefore be called after
that middleware is added). Every JSON route with data, like the API itself, needs the key:
``/docs`` loads without it and then asks for it, since ``/openapi.json`` describes the served model.

The training-run page (``/runs``) is not served from here: ``nextoken serve`` adds it (the run
viewer, ``nextoken.runs``) through the launcher's ``mounts``, reusing ``StaticPages`` and
``source_run``. This module imports nothing from training.
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.responses import FileResponse

from nextoken.fileio import read_json_object

STATIC_DIR = Path(__file__).with_name("static")
ASSET_PREFIX = "/ui/"
# /docs draws /openapi.json itself (docs.js): FastAPI's Swagger UI and ReDoc load from a CDN and are removed
# (openapi.remove_cdn_pages).
PAGES = {"/": "index.html", "/docs": "docs.html"}
AUTH_PATH = "/api/auth"
# The pages load only this server's files and talk only to it; inline scripts and styles are not used.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

mimetypes.add_type("text/javascript", ".js")  # some systems map .js to text/plain; modules need a JS type


class ServedModelView(Protocol):
    """What the playground needs of the HTTP side's served model (``Frontend.model()``)."""

    path: str
    id: str


def static_files(pages: dict[str, str], static_dir: Path = STATIC_DIR) -> dict[str, Path]:
    """URL path -> file, fixed at start-up: only files that exist here are ever served (no path joins)."""
    files = {url: static_dir / name for url, name in pages.items()}
    for f in sorted(static_dir.rglob("*")):
        if f.is_file() and not f.name.startswith("."):
            files[ASSET_PREFIX + f.relative_to(static_dir).as_posix()] = f
    return files


class StaticPages:
    """ASGI middleware: answer GET/HEAD for the playground's files and ``/api/auth``; pass the rest on."""

    def __init__(self, app: Any, *, api_key_required: bool, pages: dict[str, str] | None = None,
                 static_dir: Path = STATIC_DIR) -> None:
        self.app = app
        self.files = static_files(PAGES if pages is None else pages, static_dir)
        self.auth_body = json.dumps({"api_key_required": api_key_required}).encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            path = scope["path"]
            f = self.files.get(path)
            if f is not None:
                media = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
                await FileResponse(f, media_type=media, headers=SECURITY_HEADERS)(scope, receive, send)
                return
            if path == AUTH_PATH:
                await Response(self.auth_body, media_type="application/json",
                               headers={"Cache-Control": "no-store"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path) or {}


def source_run(artifact_dir: Path) -> Path | None:
    """The training run an artifact came from, if that folder is on this machine.

    The manifest records the run folder ``nextoken export`` read; a published version also
    carries ``run/`` (config, tokenizer, one checkpoint, but not the metrics log), used when
    the original folder is gone.
    """
    manifest = _read_json(artifact_dir / "manifest.json")
    original = (manifest.get("source") or {}).get("run")
    for candidate in ([Path(original)] if original else []) + [artifact_dir / "run"]:
        if (candidate / "config.json").is_file():
            return candidate
    return None


def _parameters(artifact_dir: Path, run: Path | None) -> tuple[int | None, str | None]:
    """The trained model's parameter count, from the training summary beside the artifact or in its run."""
    for where, label in ((artifact_dir / "summary.json", "summary.json beside the artifact"),
                         ((run / "summary.json") if run else None, "the training run's summary.json")):
        if where is None:
            continue
        params = _read_json(where).get("params")
        if isinstance(params, int):
            return params, label
    return None, None


def describe_artifact(artifact_dir: str | Path, model_id: str) -> dict[str, Any]:
    """The model panel's facts about one artifact folder (small JSON files only; no hashing)."""
    folder = Path(artifact_dir)
    config = _read_json(folder / "config.json")
    manifest = _read_json(folder / "manifest.json")
    run = source_run(folder)
    params, params_from = _parameters(folder, run)
    source = manifest.get("source") or {}
    verification = manifest.get("verification") or {}
    export = manifest.get("export") or {}
    return {
        "id": model_id,
        "name": manifest.get("name") or config.get("name"),
        "version": str(manifest.get("version") or config.get("version") or ""),
        "context": config.get("n_positions"),
        "vocab_size": config.get("vocab_size"),
        "n_layer": config.get("n_layer"),
        "n_head": config.get("n_head"),
        "n_embd": config.get("n_embd"),
        "tokenizer_kind": config.get("tokenizer_kind"),
        "dtype": config.get("torch_dtype"),
        "parameters": params,
        "parameters_from": params_from,
        "source": {"step": source.get("step"), "val_loss": source.get("val_loss"),
                   "checkpoint": source.get("checkpoint")},
        "export": {"opset": export.get("opset"), "quantize": export.get("quantize")},
        "verification": {k: verification.get(k) for k in ("passed", "prefill_max_abs_diff", "decode_max_abs_diff",
                                                           "greedy_identical_steps", "greedy_steps")
                         if k in verification},
        "run_available": run is not None,
    }


def mount_playground(app: FastAPI, model: Callable[[], ServedModelView], *, api_key_required: bool) -> None:
    """Serve the playground at ``/`` and the API page at ``/docs``.

    ``model`` returns the version taking new requests (``Frontend.model``); it is called per
    request, so a hot-reloaded version shows at once. Call this after the API-key middleware
    is added (see the module note).
    """
    cache: dict[tuple[str, str], dict[str, Any]] = {}

    def current() -> tuple[ServedModelView, dict[str, Any]]:
        m = model()
        key = (str(m.path), m.id)
        if key not in cache:
            cache.clear()  # one served version at a time
            cache[key] = describe_artifact(m.path, m.id)
        return m, cache[key]

    async def model_info(request: Request) -> Response:
        return JSONResponse(current()[1])

    app.add_api_route("/api/model", model_info, methods=["GET"], include_in_schema=False)
    app.add_middleware(StaticPages, api_key_required=api_key_required)
