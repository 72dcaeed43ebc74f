"""The run page in chromium: the served model's training run, and `nextoken runs` over run folders.

The page's numbers are checked against the run folder itself (metrics.jsonl, summary.json) and
the attention maps against the API's own answer; the serving processes are checked to load
PyTorch only once the attention maps are asked for.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, free_port

# The first test to use them builds the session's model (train + export): minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _torch_loaded(pids: list[int]) -> list[int]:
    """The processes among ``pids`` that have PyTorch's library mapped (imported torch)."""
    out = []
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        if "libtorch" in maps:
            out.append(pid)
    return out


@pytest.fixture(scope="module")
def run_server(pg_artifact: Path) -> Iterator[ServerProcess]:
    """Its own server: whether torch is loaded must not depend on which test ran first."""
    s = ServerProcess(pg_artifact, "--max-batch-size", "2")
    yield s
    s.stop()


def test_served_models_run_page_draws_the_run_folder(run_server, pg_run, open_page, shots) -> None:
    url = run_server.url
    page, _ = open_page(url + "/runs")
    records = _records(pg_run)
    summary = json.loads((pg_run / "summary.json").read_text())
    config = json.loads((pg_run / "config.json").read_text())
    vocab = config["tokenizer"]["vocab_size"]
    evals = [r for r in records if r["event"] == "eval"]
    assert page.inner_text("#run-title") == pg_run.name
    assert page.inner_text('#run-facts dd[data-fact="steps"]') == f"{summary['steps']:,}"
    assert page.get_attribute("svg.chart polyline.val", "data-points") == str(len(evals))
    assert page.get_attribute("svg.chart polyline.train", "data-points") == str(
        len([r for r in records if r["event"] == "train"]))
    assert float(page.get_attribute("svg.chart line.logv", "data-value")) == pytest.approx(math.log(vocab))
    assert f"log(vocab) = log({vocab}) = {math.log(vocab):.2f}" in page.text_content("svg.chart")
    assert abs(evals[0]["val_loss"] - math.log(vocab)) < 0.5  # the untrained model starts at a uniform guess
    samples = {}
    for r in records:
        if r["event"] == "sample":
            samples.setdefault(r["step"], []).append(r["text"])
    shown = page.locator("#samples li").evaluate_all(
        "els => els.map(e => [Number(e.dataset.step), [...e.querySelectorAll('pre')].map(p => p.textContent)])")
    assert shown == [[s, t] for s, t in sorted(samples.items())]
    assert page.is_visible("#playground-link")  # served: the playground is one click away

    pids = run_server.group_pids()
    assert _torch_loaded(pids) == []  # the run page so far read JSON files only
    page.fill("#attn-text", "the cat sat")
    page.select_option("#attn-ckpt", "latest")
    page.click("#attn-go")
    page.wait_for_selector("#attn-big canvas")
    n_layer, n_head = config["model"]["n_layer"], config["model"]["n_head"]
    assert page.locator("#attn-maps canvas").count() == n_layer * n_head
    r = httpx.post(url + "/api/runs/served/attention", json={"text": "the cat sat", "checkpoint": "latest"},
                   timeout=60).json()
    n_tok = len(r["labels"])
    assert r["labels"][0] == "<eot>" and n_tok == len("the cat sat") + 1 and len(r["maps"]) == n_layer
    for layer in r["maps"]:
        for head in layer:
            for q, row in enumerate(head):
                assert sum(row) == pytest.approx(1.0, abs=2e-3) and all(w == 0 for w in row[q + 1:])  # causal
    assert page.inner_text("#attn-status").startswith(f"{n_tok} tokens · checkpoint step-")
    page.click(f'.head button[data-layer="{n_layer - 1}"][data-head="{n_head - 1}"]')
    big = page.locator("#attn-big canvas")
    assert (big.get_attribute("data-layer"), big.get_attribute("data-head")) == (str(n_layer - 1), str(n_head - 1))
    page.screenshot(path=str(shots / "run-page.png"), full_page=True)
    assert _torch_loaded(pids) != []  # asked for attention: now (and only now) PyTorch was imported


def test_attention_errors_name_the_field(run_server) -> None:
    url = run_server.url + "/api/runs/served/attention"
    r = httpx.post(url, json={"text": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text"
    r = httpx.post(url, json={"text": "x" * 300})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text" and "256" in r.json()["error"]["message"]
    r = httpx.post(url, json={"text": "the", "checkpoint": "12345"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "checkpoint" and "12345" in r.text
    r = httpx.post(url, content=b"text=the", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert httpx.get(run_server.url + "/api/runs/nope").status_code == 404


def _copy_run(src: Path, dest: Path, *, unfinished: bool = False) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("checkpoints", "data", "tb"))
    if unfinished:  # as a run still training looks: no summary yet, the log stops at the first evaluation
        (dest / "summary.json").unlink()
        records = _records(src)
        first_eval = next(i for i, r in enumerate(records) if r["event"] == "eval")
        (dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:first_eval + 1]))
    return dest


def test_nextoken_runs_lists_runs_and_follows_one_that_is_training(pg_run, tmp_path, open_page) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    _copy_run(pg_run, runs / "a-finished")
    live = _copy_run(pg_run, runs / "b-training", unfinished=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "nextoken", "runs", str(runs), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/api/runs", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "nextoken runs did not start"
            time.sleep(0.1)
        listed = httpx.get(url + "/api/runs").json()
        assert listed["context"] == "runs" and [r["id"] for r in listed["data"]] == ["a-finished", "b-training"]
        assert [r["finished"] for r in listed["data"]] == [True, False]

        page, _ = open_page(url + "/?run=b-training")
        assert page.is_hidden("#playground-link")  # no model served here
        assert page.is_visible("#run-pick") and page.input_value("#run-select") == "b-training"
        assert page.inner_text("#run-state").startswith("training")
        assert page.get_attribute("svg.chart polyline.val", "data-points") == "1"
        assert page.is_disabled("#attn-go") and "No checkpoint" in page.inner_text("#attn-note")
        with (live / "metrics.jsonl").open("a") as fh:  # training goes on: the next evaluation and the end
            for r in _records(pg_run):
                if r["event"] == "eval" and r["step"] > 0:
                    fh.write(json.dumps(r) + "\n")
            fh.write(json.dumps({"event": "summary", "step": 4}) + "\n")
        page.wait_for_selector('#run-state:text-is("finished")', timeout=15_000)  # the page re-read the folder
        n_evals = len([r for r in _records(pg_run) if r["event"] == "eval"])
        assert page.get_attribute("svg.chart polyline.val", "data-points") == str(n_evals)
        page.select_option("#run-select", "a-finished")
        page.wait_for_selector('#run-title:text-is("a-finished")')
        assert page.evaluate("() => location.search") == "?run=a-finished"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        proc.wait(15)
    assert "run page for a-finished, b-training" in proc.stdout.read()


@pytest.fixture
def runs_app_without_torch(pg_run: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """`nextoken runs`'s app in this process, on a thread, with PyTorch reported missing."""
    import uvicorn

    from nextoken.runs import routes as runs_mod
    from nextoken.runs.app import build_app

    monkeypatch.setattr(runs_mod, "attention_available", lambda: False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app([str(pg_run)]), host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(10)


def test_without_the_train_extra_the_page_says_what_attention_needs(runs_app_without_torch, pg_run, open_page) -> None:
    url = runs_app_without_torch
    r = httpx.post(f"{url}/api/runs/{pg_run.name}/attention", json={"text": "the cat"})
    assert r.status_code == 501 and r.json()["error"]["code"] == "needs_train_extra"
    assert "pip install 'nextoken[train]'" in r.json()["error"]["message"]
    page, _ = open_page(url + "/")
    assert page.is_disabled("#attn-go")
    note = page.inner_text("#attn-note")
    assert "pip install 'nextoken[train]'" in note and "need nothing extra" in note
    assert page.locator("svg.chart polyline.val").count() == 1  # the curve needs no PyTorch
