"""The playground's server side in-process: which files are served, to whom, and what the JSON routes read."""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from nextoken.serve.http.playground import (
    ASSET_PREFIX,
    CSP,
    PAGES,
    STATIC_DIR,
    StaticPages,
    describe_artifact,
    mount_playground,
    source_run,
    static_files,
)

REPO = Path(__file__).resolve().parents[2]


class _Model:
    def __init__(self, path: Path, model_id: str = "pg:1") -> None:
        self.path = str(path)
        self.id = model_id


def _app(model_path: Path, *, key: str | None = None) -> FastAPI:
    from nextoken.serve.http.middleware import ApiKeyMiddleware

    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict:
        return {"data": []}

    if key:
        app.add_middleware(ApiKeyMiddleware, api_key=key)
    mount_playground(app, lambda: _Model(model_path), api_key_required=key is not None)
    return app


def test_only_the_static_folders_files_are_served_with_the_csp(tmp_path: Path) -> None:
    files = static_files(PAGES)
    assert set(PAGES) <= set(files)
    for url, f in files.items():
        assert f.resolve().is_relative_to(STATIC_DIR.resolve()) and f.is_file(), url
    assert {"/ui/index.html", "/ui/playground.js", "/ui/common.js", "/ui/style.css", "/ui/docs.js",
            "/ui/openapi.js"} <= set(files)
    client = TestClient(_app(tmp_path, key="k"))
    for url in ("/", "/ui/playground.js"):
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-security-policy"] == CSP, url
        assert r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/ui/playground.js").headers["content-type"].startswith("text/javascript")  # modules need it
    head = client.head("/")
    assert head.status_code == 200 and head.content == b""
    for sneaky in ("/ui/../playground.py", "/ui/%2e%2e/playground.py", "/ui/vendor/../../server.py", "/ui/",
                   "/ui/.hidden", "/index.html"):
        assert client.get(sneaky).status_code in (401, 404), sneaky  # never a file outside the list
    assert client.post("/").status_code in (401, 404, 405)  # only GET/HEAD are answered outside the key


def test_fastapis_cdn_pages_are_removed_and_docs_is_ours(tmp_path: Path) -> None:
    """FastAPI mounts Swagger UI (/docs) and ReDoc (/redoc), which load from a CDN; the app keeps /openapi.json
    and answers /docs with the static page only once the playground is mounted."""
    from nextoken.serve.http.openapi import Limits, install_openapi

    def app(*, pages: bool) -> FastAPI:
        a = FastAPI()
        install_openapi(a, lambda: Limits(context=64, vocab_size=65, capacity=4, max_body_bytes=1 << 20))
        if pages:
            mount_playground(a, lambda: _Model(tmp_path), api_key_required=False)
        return a

    assert "cdn" in TestClient(FastAPI()).get("/docs").text  # what FastAPI gives by default
    client = TestClient(app(pages=False))
    for gone in ("/docs", "/docs/oauth2-redirect", "/redoc"):
        assert client.get(gone).status_code == 404, gone
    assert "/v1/completions" in client.get("/openapi.json").json()["paths"]
    page = TestClient(app(pages=True)).get("/docs")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    assert '<script type="module" src="/ui/docs.js">' in page.text


def test_pages_skip_the_key_but_data_routes_do_not(tmp_path: Path) -> None:
    client = TestClient(_app(tmp_path, key="k"))
    assert client.get("/api/auth").json() == {"api_key_required": True}
    assert client.get("/api/model").status_code == 401
    assert client.get("/api/model", headers={"Authorization": "Bearer k"}).status_code == 200
    assert TestClient(_app(tmp_path)).get("/api/auth").json() == {"api_key_required": False}


def test_packaging_ships_every_static_file() -> None:
    """`pip install .` (no editable source tree) must carry the pages: package-data globs cover each file."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = setuptools["package-data"]["nextoken.serve.http"]
    for f in STATIC_DIR.rglob("*"):
        if f.is_file():
            rel = f.relative_to(STATIC_DIR.parent).as_posix()
            assert any(fnmatch(rel, g) and rel.count("/") == g.count("/") for g in data), rel


def test_describe_artifact_reads_a_published_version(tmp_path: Path) -> None:
    version = tmp_path / "models" / "3"
    (version / "run").mkdir(parents=True)
    (version / "run" / "config.json").write_text("{}")
    (version / "config.json").write_text(json.dumps({"n_positions": 128, "vocab_size": 2048, "n_layer": 4,
                                                     "n_head": 4, "n_embd": 128, "tokenizer_kind": "bpe"}))
    (version / "manifest.json").write_text(json.dumps({
        "name": "mini", "version": "3", "source": {"run": str(tmp_path / "gone"), "step": 1200, "val_loss": 4.1},
        "verification": {"passed": True, "prefill_max_abs_diff": 1e-6, "greedy_steps": 64}}))
    (version / "summary.json").write_text(json.dumps({"params": 3_200_000}))
    d = describe_artifact(version, "mini:3")
    assert (d["name"], d["version"], d["context"], d["vocab_size"], d["parameters"]) == ("mini", "3", 128, 2048,
                                                                                         3_200_000)
    assert d["parameters_from"] == "summary.json beside the artifact" and d["source"]["step"] == 1200
    assert source_run(version) == version / "run"  # the original run folder is gone: the published copy
    assert d["run_available"] and d["verification"]["passed"]


def test_static_pages_pass_other_requests_through() -> None:
    seen = []

    async def inner(scope, receive, send) -> None:
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    client = TestClient(StaticPages(inner, api_key_required=False))
    assert client.get(ASSET_PREFIX + "nope.js").status_code == 204 and client.get("/v1/models").status_code == 204
    assert seen == [ASSET_PREFIX + "nope.js", "/v1/models"]
