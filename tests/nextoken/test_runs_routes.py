"""The run viewer's server side in-process: its pages and files, what its JSON routes read, what they import.

The served model's run page is checked as ``nextoken serve`` builds it: the playground, then the
run viewer's mount (``served_run``) on top.
"""

from __future__ import annotations

import json
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from nextoken.fileio import read_jsonl
from nextoken.runs.app import SERVED_PAGES, STANDALONE_PAGES, STATIC_DIR, build_app, served_run
from nextoken.runs.routes import MAX_TRAIN_POINTS, find_runs, run_details
from nextoken.serve.http.playground import CSP, mount_playground, static_files

REPO = Path(__file__).resolve().parents[2]


class _Model:
    def __init__(self, path: Path, model_id: str = "pg:1") -> None:
        self.path = str(path)
        self.id = model_id


def _served_app(model_path: Path, *, key: str | None = None) -> FastAPI:
    """What `nextoken serve` serves around the API: the key, the playground, then the run viewer's mount."""
    from nextoken.serve.http.middleware import ApiKeyMiddleware

    app = FastAPI()
    if key:
        app.add_middleware(ApiKeyMiddleware, api_key=key)
    mount_playground(app, lambda: _Model(model_path), api_key_required=key is not None)
    served_run(api_key_required=key is not None)(app, lambda: _Model(model_path))
    return app


@pytest.mark.parametrize("app", ["served", "standalone"])
def test_the_run_page_and_its_files_are_served_with_the_csp(tmp_path: Path, app: str) -> None:
    pages = SERVED_PAGES if app == "served" else STANDALONE_PAGES
    files = static_files(pages, STATIC_DIR)
    assert set(pages) <= set(files) and {"/ui/runs.html", "/ui/runs.js"} <= set(files)
    for url, f in files.items():
        assert f.resolve().is_relative_to(STATIC_DIR.resolve()) and f.is_file(), url
    client = TestClient(_served_app(tmp_path, key="k") if app == "served" else build_app([str(tmp_path)], "k"))
    # The page, its script, and the playground's shared files it loads: all without the key.
    for url in (*pages, "/ui/runs.js", "/ui/common.js", "/ui/style.css"):
        r = client.get(url)
        assert r.status_code == 200 and r.headers["content-security-policy"] == CSP, url
        assert r.headers["x-content-type-options"] == "nosniff"
    assert client.get("/runs").text == (STATIC_DIR / "runs.html").read_text()
    assert client.get("/ui/runs.js").headers["content-type"].startswith("text/javascript")  # modules need it
    for sneaky in ("/ui/../routes.py", "/ui/%2e%2e/app.py", "/ui/.hidden", "/runs.html"):
        assert client.get(sneaky).status_code in (401, 404), sneaky  # never a file outside the list
    assert client.post("/runs").status_code in (401, 404, 405)  # only GET/HEAD are answered outside the key
    assert client.get("/api/runs").status_code == 401  # the data needs the key
    assert client.get("/api/runs", headers={"Authorization": "Bearer k"}).status_code == 200
    assert client.get("/api/auth").json() == {"api_key_required": True}


def test_packaging_ships_every_static_file() -> None:
    """`pip install .` (no editable source tree) must carry the run page: package-data globs cover each file."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "nextoken.runs" in pyproject["packages"]
    data = pyproject["package-data"]["nextoken.runs"]
    for f in STATIC_DIR.rglob("*"):
        if f.is_file():
            rel = f.relative_to(STATIC_DIR.parent).as_posix()
            assert any(fnmatch(rel, g) and rel.count("/") == g.count("/") for g in data), rel


def test_run_details_tolerate_a_log_being_written_and_thin_long_curves(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"vocab_size": 65, "block_size": 64},
                                                 "tokenizer": {"kind": "char", "vocab_size": 65}}))
    n = 2 * MAX_TRAIN_POINTS + 3
    lines = [json.dumps({"event": "train", "step": i, "loss": 4.0 - i / n}) for i in range(1, n + 1)]
    lines += [json.dumps({"event": "eval", "step": n, "train_loss": 1.0, "val_loss": 1.5}),
              json.dumps({"event": "sample", "step": n, "text": "hi"})]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"event": "train", "st')  # a line half written
    assert len(read_jsonl(run / "metrics.jsonl")) == n + 2
    d = run_details("r", run)
    assert d["train_points_total"] == n and len(d["train_points"]) <= MAX_TRAIN_POINTS + 1
    assert d["train_points"][0][0] == 1 and d["train_points"][-1][0] == n  # both ends kept
    assert d["log_vocab"] == pytest.approx(4.174387, abs=1e-6) and not d["finished"]
    assert d["samples"] == [{"step": n, "texts": ["hi"]}] and d["checkpoints"] == []


def test_find_runs_takes_run_folders_and_folders_of_runs(tmp_path: Path) -> None:
    for p in ("a/run1", "a/run2", "b/run1", "c"):
        (tmp_path / p).mkdir(parents=True)
        (tmp_path / p / "config.json").write_text("{}")
    (tmp_path / "a" / "notes").mkdir()
    found = find_runs([tmp_path / "a", tmp_path / "b", tmp_path / "c"])
    assert found == {"run1": tmp_path / "a/run1", "run2": tmp_path / "a/run2", "run1-2": tmp_path / "b/run1",
                     "c": tmp_path / "c"}


@pytest.mark.timeout(900)  # may be the first user of the session's model (train + export)
def test_serving_side_imports_no_training_code_until_attention_is_asked_for(pg_artifact: Path) -> None:
    """In a fresh process: the playground and the run page (curve, samples) leave torch and nextoken.train
    unimported; the first attention request imports them."""
    code = f"""
import sys
from fastapi import FastAPI
from starlette.testclient import TestClient
from nextoken.runs.app import served_run
from nextoken.serve.http.playground import mount_playground

class M:
    path = {str(pg_artifact)!r}
    id = "pg:1"

app = FastAPI()
mount_playground(app, lambda: M, api_key_required=False)
served_run(api_key_required=False)(app, lambda: M)
c = TestClient(app)
for p in ("/", "/runs", "/ui/playground.js", "/api/model", "/api/runs", "/api/runs/served"):
    assert c.get(p).status_code == 200, p
assert c.get("/api/model").json()["run_available"]
heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith("nextoken.train"))
assert heavy == [], heavy
r = c.post("/api/runs/served/attention", json={{"text": "the cat"}})
assert r.status_code == 200, r.text
assert "torch" in sys.modules and "nextoken.train.probe" in sys.modules
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
