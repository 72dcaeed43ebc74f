"""`nextoken up`: one command from text files to a published version (and a running server), on a tiny budget."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

# Each test trains and exports (and serves) a model: minutes on a shared 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Over the quickstart preset: a model that trains in seconds (the preset's own budget is ~150 s).
TINY = """
tokenizer = "char"
n_layer = 2
n_head = 2
n_embd = 32
block_size = 64
batch_size = 8
max_iters = 20
eval_interval = 10
eval_iters = 2
log_interval = 5
warmup_iters = 5
learning_rate = 3e-3
min_lr = 3e-4
sample_tokens = 8
tensorboard = false
threads = 1
"""


def _up_cmd(tmp: Path, corpus: Path, *extra: str) -> list[str]:
    (tmp / "tiny.toml").write_text(TINY, encoding="utf-8")
    return [sys.executable, "-m", "nextoken", "up", "--data", str(corpus), "--config", str(tmp / "tiny.toml"),
            "--out-dir", str(tmp / "runs" / "up"), "--artifact-dir", str(tmp / "artifacts" / "up"),
            "--models-dir", str(tmp / "models"), *extra]


@pytest.fixture(scope="module")
def up_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the --no-serve run and the serving run, so the second is also a re-run in the same folders."""
    return tmp_path_factory.mktemp("up")


def test_up_no_serve_trains_exports_verifies_and_publishes(up_dir: Path, tiny_corpus: Path) -> None:
    tmp_path = up_dir
    r = subprocess.run(_up_cmd(tmp_path, tiny_corpus, "--no-serve"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stderr
    for header in ("[1/4] train: char tokenizer -> tokens -> 2-layer GPT", "[2/4] export", "[3/4] publish"):
        assert header in err, err[-3000:]
    assert "[4/4]" not in err and "done (--no-serve)" in err
    run, art, models = tmp_path / "runs" / "up", tmp_path / "artifacts" / "up", tmp_path / "models"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20 and (run / "up.json").is_file()
    # each stage says what it produced, with the figures it produced
    assert re.search(rf"tokenizer +{re.escape(str(run / 'tokenizer.json'))} \(char, {summary['vocab_size']} tokens\)",
                     err)
    assert f"best val loss {summary['best_val_loss']:.3f}" in err and "log(vocab) =" in err
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["verification"]["passed"] is True
    assert f"greedy tokens identical {manifest['verification']['greedy_identical_steps']}/" in err
    assert os.readlink(models / "current") == "1" and (models / "1" / "run" / "checkpoints").is_dir()
    published = json.loads((models / "1" / "manifest.json").read_text())
    assert published["version"] == "1" and published["name"] == "up"
    assert "nextoken serve" in err



def test_up_refuses_before_training(tmp_path: Path, tiny_corpus: Path) -> None:
    someone = tmp_path / "runs" / "up"
    someone.mkdir(parents=True)
    (someone / "notes.txt").write_text("not a run `up` made")
    r = subprocess.run(_up_cmd(tmp_path, tiny_corpus, "--no-serve"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--out-dir" in r.stderr and "not made by `nextoken up`" in r.stderr
    assert (someone / "notes.txt").is_file() and not (tmp_path / "models").exists()

    import socket

    other = tmp_path / "x"
    other.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        taken.listen()
        t0 = time.monotonic()
        r = subprocess.run(_up_cmd(other, tiny_corpus, "--port", str(port)), capture_output=True, text=True,
                           timeout=120)
    assert r.returncode == 2 and "--port" in r.stderr and "not free" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t0 < 60 and not (other / "runs").exists()  # refused before any training


def _session_pids(sid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_up_serves_the_playground_and_stops_on_ctrl_c(up_dir: Path, tiny_corpus: Path) -> None:
    """After the --no-serve test this is also a re-run: `up` clears the run folder it made, publishes the next
    version beside the previous one and serves it."""
    from nextoken.registry import current_version, next_version

    tmp_path = up_dir
    models = tmp_path / "models"
    before, version = current_version(models) if models.exists() else None, next_version(models)
    port = free_port()
    log = (tmp_path / "up.log").open("w+")
    proc = subprocess.Popen(_up_cmd(tmp_path, tiny_corpus, "--port", str(port)), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 900
        while f"ready: {url}/" not in (tmp_path / "up.log").read_text():
            assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "nextoken up did not become ready"
            time.sleep(0.5)
        text = (tmp_path / "up.log").read_text()
        assert "[4/4] serve:" in text and f"{url}/runs" in text and "Ctrl-C stops the server" in text
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "nextoken playground" in page.text
        r = httpx.post(url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 8, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert r.json()["model"] == f"up:{version}" and os.readlink(models / "current") == version
        if before is not None:
            assert (models / before / "manifest.json").is_file()  # the earlier version stays published
        assert json.loads((tmp_path / "runs" / "up" / "summary.json").read_text())["steps"] == 20  # fresh run
        runs = httpx.get(url + "/api/runs").json()["data"]  # the run page shows the run `up` trained
        assert [Path(x["path"]).resolve() for x in runs] == [(tmp_path / "runs" / "up").resolve()]
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 1  # the server, in its own session
        pids = set(_session_pids(proc.pid)) | set(_session_pids(int(children[0])))
        assert len(pids) >= 3  # up, the server's main process and at least its API process and worker
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to `up`'s process group
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 20
        while [p for p in pids if _alive(p)]:
            assert time.monotonic() < deadline, f"left running after Ctrl-C: {[p for p in pids if _alive(p)]}"
            time.sleep(0.1)
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
        assert "draining" in (tmp_path / "up.log").read_text()  # the server drained (one signal, not two)
    finally:
        for p in pids | {proc.pid}:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
        log.close()


def test_the_printed_curl_works_as_printed(serve_artifact: Path) -> None:
    """The request `up` prints (with the key header when the server needs a key) gets a stream, not a 401/400."""
    import shlex

    from nextoken.up import example_curl
    from tests.conftest import ServerProcess

    s = ServerProcess(serve_artifact, "--api-key-env", "UP_TEST_KEY", env={"UP_TEST_KEY": "sekret"})
    try:
        words = shlex.split(example_curl(s.url, "UP_TEST_KEY", serve_artifact))
        assert words[:2] == ["curl", "-N"]
        headers = dict(h.split(": ", 1) for h in (words[i + 1] for i, w in enumerate(words) if w == "-H"))
        with pytest.MonkeyPatch.context() as mp:  # as the user's shell expands it, with the key exported
            mp.setenv("UP_TEST_KEY", "sekret")
            headers = {k: os.path.expandvars(v) for k, v in headers.items()}
        body = words[words.index("-d") + 1]
        r = httpx.post(words[2], headers=headers, content=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.text.rstrip().endswith("data: [DONE]")
    finally:
        s.stop()
