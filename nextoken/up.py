"""`nextoken up`: text -> tokenizer -> trained model -> verified ONNX artifact -> published version -> server.

One command for a new user: each stage prints what it produced (files, sizes, losses, the
parity figures) under a numbered header with its own progress bar, and the last stage starts
``nextoken serve`` on the models folder's ``current`` pointer, so the playground, the run page
and ``/metrics`` are up at the printed URL (and a later ``nextoken retrain`` into the same
models folder is picked up by the running server).

The server runs as a child process in its own session; this process forwards SIGINT and
SIGTERM to that session once per signal, so Ctrl-C drains it exactly as it drains a
``nextoken serve`` started by hand (a second Ctrl-C stops at once), and it exits with the
server's status. Needs the ``[train]`` extra (training and export); the server it starts does not.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nextoken.errors import UserError

MARKER = "up.json"  # in a run folder `up` created: it may clear that folder on the next run
HEALTH_TIMEOUT_S = 120.0
STAGES = 4


@dataclass
class UpOptions:
    preset: str | None = "quickstart"
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields from flags
    out_dir: str = "runs/up"
    artifact_dir: str = "artifacts/up"
    models_dir: str = "models"
    name: str | None = None
    keep: int = 5
    serve: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None
    max_batch_size: int = 32


@dataclass
class UpResult:
    run_dir: Path
    artifact_dir: Path
    version_dir: Path
    summary: dict[str, Any]
    url: str | None = None
    server_exit: int | None = None


def _say(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def _stage(n: int, title: str) -> None:
    _say(f"\n[{n}/{STAGES}] {title}")


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def check_options(opts: UpOptions) -> None:
    """Everything that can be refused before minutes of training are spent."""
    if opts.keep < 1:
        raise UserError(f"must be >= 1, got {opts.keep}", flag="--keep")
    if not opts.serve:
        return
    if not 1 <= opts.port <= 65535:
        raise UserError(f"must be in 1..65535, got {opts.port}", flag="--port")
    if opts.host not in ("127.0.0.1", "0.0.0.0", "::"):
        raise UserError(f"must be 127.0.0.1, 0.0.0.0 or ::, got {opts.host!r}", flag="--host")
    if opts.max_batch_size < 1:
        raise UserError(f"must be >= 1, got {opts.max_batch_size}", flag="--max-batch-size")
    if opts.api_key_env and not os.environ.get(opts.api_key_env):
        raise UserError(f"environment variable {opts.api_key_env} is not set or empty", flag="--api-key-env")
    family = socket.AF_INET6 if opts.host == "::" else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((opts.host, opts.port))
        except OSError as e:
            raise UserError(f"{opts.host}:{opts.port} is not free ({e.strerror}); choose another port",
                            flag="--port") from None


def prepare_run_dir(out: Path) -> None:
    """Start fresh in a folder `up` made before; refuse any other non-empty folder (it may be someone's run)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder", flag="--out-dir")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(f"{out} is not empty and was not made by `nextoken up`; choose a new or empty "
                            "--out-dir", flag="--out-dir")
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"created_by": "nextoken up", "started": time.time()}) + "\n",
                              encoding="utf-8")


def train_stage(opts: UpOptions) -> tuple[Path, dict[str, Any]]:
    from nextoken.train.loop import train
    from nextoken.train.settings import resolve_train_config

    out = Path(opts.out_dir)
    for key in ("out_dir", "resume"):
        if opts.overrides.get(key) is not None:
            raise UserError("`nextoken up` trains from scratch into --out-dir", flag="--" + key.replace("_", "-"))
    cfg = resolve_train_config(opts.preset, opts.config, dict(opts.overrides, out_dir=str(out), resume="never"))
    prepare_run_dir(out)
    budget = [f"{cfg.max_iters} steps"] + ([f"at most {cfg.max_time:.0f} s"] if cfg.max_time else [])
    source = ", ".join(cfg.data) if cfg.data else "the built-in corpus (the Python standard library's source)"
    _stage(1, f"train: {cfg.tokenizer} tokenizer -> tokens -> {cfg.n_layer}-layer GPT on {source} "
              f"({' or '.join(budget)}; --max-time changes it)")
    summary = train(cfg)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    tok = config.get("tokenizer") or {}
    manifest = json.loads((out / "data" / "manifest.json").read_text(encoding="utf-8"))
    n_tok, split = int(manifest["num_tokens"]), int(manifest["split"])
    best = summary.get("best_val_loss")
    vocab = int(summary["vocab_size"])
    _say(f"  tokenizer   {out / 'tokenizer.json'} ({tok.get('kind')}, {vocab:,} tokens)")
    _say(f"  tokens      {out / 'data'} ({n_tok:,} tokens from {manifest['num_documents']:,} documents: "
         f"{split:,} train / {n_tok - split:,} val)")
    _say(f"  model       {out / 'checkpoints'} ({summary['params'] / 1e6:.2f}M parameters, {summary['steps']} steps "
         f"in {summary['train_time_s']:.0f} s; best val loss {best:.3f} at step {summary['best_val_step']}, "
         f"from log(vocab) = {math.log(vocab):.2f} for a uniform guess)")
    _say(f"  loss curve  {out / 'loss.png'}")
    return out, summary


def export_stage(opts: UpOptions, run: Path) -> tuple[Path, str]:
    from nextoken.export.build import export_run
    from nextoken.registry import next_version

    _stage(2, "export: checkpoint -> ONNX artifact, checked against PyTorch")
    version = next_version(opts.models_dir)  # publish re-stamps it if another job publishes first
    name = opts.name or run.resolve().name
    with tqdm(desc="export", unit="step", file=sys.stderr, dynamic_ncols=True,
              bar_format="{desc}: {n_fmt} steps, {elapsed}{postfix}") as bar:
        def log(msg: str) -> None:
            bar.write(f"  {msg.strip()}", file=sys.stderr)
            bar.update(1)

        art = export_run(run, opts.artifact_dir, checkpoint="best", name=name, version=version, verify=True, log=log)
    manifest = json.loads((art / "manifest.json").read_text(encoding="utf-8"))
    v = manifest.get("verification") or {}
    size = sum(f.stat().st_size for f in art.iterdir() if f.is_file())
    parity = "?"
    if "prefill_max_abs_diff" in v:
        parity = (f"max |dlogit| prefill {v['prefill_max_abs_diff']:.1e} / decode {v['decode_max_abs_diff']:.1e}, "
                  f"greedy tokens identical {v['greedy_identical_steps']}/{v['greedy_steps']}")
    _say(f"  artifact    {art} ({_human_bytes(size)}; ONNX Runtime vs PyTorch: {parity})")
    return art, name


def publish_stage(opts: UpOptions, art: Path, run: Path, summary: dict[str, Any]) -> Path:
    from nextoken.registry import publish

    _stage(3, f"publish: into the models folder {opts.models_dir}")
    with tqdm(total=1, desc="publish", unit="version", file=sys.stderr, dynamic_ncols=True) as bar:
        path = publish(art, opts.models_dir, run_dir=run, summary=summary, keep=opts.keep)
        bar.update(1)
    _say(f"  version     {path} (current -> {path.name}; `nextoken retrain --models-dir {opts.models_dir}` "
         "publishes the next one, which a running server loads by itself)")
    return path


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ready", timeout=1) as r:  # readiness: the model is loaded
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def example_curl(url: str, api_key_env: str | None, version_dir: Path) -> str:
    """A request that works as printed: the key when the server needs one, and tokens the context holds."""
    context = int(json.loads((version_dir / "config.json").read_text(encoding="utf-8"))["n_positions"])
    body = json.dumps({"prompt": "def ", "max_tokens": min(64, context // 2), "stream": True})
    auth = f" -H \"Authorization: Bearer ${api_key_env}\"" if api_key_env else ""
    return f"curl -N {url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'"


def serve_stage(opts: UpOptions, version_dir: Path) -> tuple[str, int]:
    """Start `nextoken serve MODELS/current`, wait until healthy, print the URL, relay signals until it exits."""
    current = Path(opts.models_dir) / "current"
    shown_host = "127.0.0.1" if opts.host in ("0.0.0.0", "::") else opts.host
    url = f"http://{shown_host}:{opts.port}"
    _stage(4, f"serve: {current} with the playground and metrics")
    cmd = [sys.executable, "-m", "nextoken", "serve", str(current), "--host", opts.host, "--port", str(opts.port),
           "--max-batch-size", str(opts.max_batch_size)]
    if opts.api_key_env:
        cmd += ["--api-key-env", opts.api_key_env]
    # Its own session: a terminal's Ctrl-C reaches only this process, which passes it on once
    # (two deliveries would be the server's "second signal: stop now").
    child = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        with tqdm(desc="starting", unit="s", file=sys.stderr, dynamic_ncols=True,
                  bar_format="{desc}: {elapsed}") as bar:
            while not _ready(url):
                if child.poll() is not None:
                    raise UserError(f"the server exited with status {child.returncode} before it was ready "
                                    "(its messages are above)", flag="serve")
                if time.monotonic() > deadline:
                    raise UserError(f"the server was not ready after {HEALTH_TIMEOUT_S:.0f} s", flag="serve")
                time.sleep(0.2)
                bar.refresh()
        key_note = f" (send Authorization: Bearer ${opts.api_key_env})" if opts.api_key_env else ""
        _say(f"\nready: {url}/{key_note}")
        _say(f"  {url}/           the playground: type a prompt and watch the model pick each token, shaded by its")
        _say("                      probability; click one to see the alternatives it weighed (P(\"blue\") = 0.79)")
        _say(f"  {url}/runs       this model's training run: loss curve from log(vocab), samples, attention")
        _say(f"  {url}/metrics    Prometheus metrics (tokens/s, TTFT, running and waiting requests)")
        _say(f"  {url}/v1/completions  the OpenAI-compatible API, e.g.")
        _say(f"      {example_curl(url, opts.api_key_env, version_dir)}")
        _say("Ctrl-C stops the server (requests in flight finish first).")
        rc = child.wait()
    except BaseException:
        forward(signal.SIGTERM, None)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(30)
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        # The server stops every process it started; anything still in its session is a leftover.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        if child.poll() is None:
            child.wait()
    return url, rc


def up(opts: UpOptions) -> UpResult:
    check_options(opts)
    run, summary = train_stage(opts)
    art, _name = export_stage(opts, run)
    version_dir = publish_stage(opts, art, run, summary)
    result = UpResult(run, art, version_dir, summary)
    if not opts.serve:
        _say(f"\ndone (--no-serve). Serve it with: nextoken serve {Path(opts.models_dir) / 'current'}")
        return result
    result.url, result.server_exit = serve_stage(opts, version_dir)
    return result
