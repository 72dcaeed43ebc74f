"""The run page's data: a training run folder read as JSON, and attention maps from its checkpoint.

Routes (mounted by ``RunRoutes.mount``; the page itself is ``static/runs.html``, served by ``app``):

* ``GET /api/runs``: the runs on offer (``{"data": [...], "context": "served" | "runs"}``);
* ``GET /api/runs/{id}``: one run: loss records (train and val), ``log(vocab)``, samples at each
  evaluation, its summary and checkpoints. Read from ``metrics.jsonl``, ``summary.json`` and
  ``config.json`` on every request, so a run still training shows its newest evaluation;
* ``POST /api/runs/{id}/attention`` ``{"text", "checkpoint"}``: softmax attention weights of
  the text for every layer and head, computed by ``nextoken.train.probe.attention_maps``
  from the checkpoint.

Only the last route needs PyTorch and the training code, and imports them when first called
(without them it answers 501 naming the ``[train]`` extra); everything else reads small
files, so a serving install (no torch) shows loss curves and samples. Run ids come from a
listing made by this server, never from joining a client's text onto a path.
"""

from __future__ import annotations

import importlib.util
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from nextoken.errors import UserError
from nextoken.fileio import read_json_object, read_jsonl

MAX_TRAIN_POINTS = 4000  # points of the train-loss curve sent to the page (the log keeps every one)
MAX_ATTENTION_TOKENS = 256  # a page of T x T maps per head stays drawable and the JSON small
MAX_TEXT_CHARS = 4000
TRAIN_EXTRA = "pip install 'nextoken[train]'"
# UserError flags raised by the training code -> the request field they are about
_FLAG_PARAMS = {"--text": "text", "--checkpoint": "checkpoint", "RUN": "run", "--layers": "layers"}


def _error(status: int, message: str, *, param: str | None = None, code: str = "invalid_value") -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def list_checkpoints(run: Path) -> list[dict[str, Any]]:
    out = []
    for d in sorted((run / "checkpoints").glob("step-*")):
        meta = read_json_object(d / "meta.json")
        if meta is None:
            continue  # being written, or not a checkpoint
        out.append({"name": d.name, "step": meta.get("step"), "val_loss": _finite(meta.get("val_loss")),
                    "train_loss": _finite(meta.get("train_loss"))})
    return out


def find_runs(paths: list[Path]) -> dict[str, Path]:
    """Run id -> folder: each path that is a run folder, or the run folders directly inside it."""
    found: dict[str, Path] = {}

    def add(run: Path) -> None:
        rid, n = run.name or "run", 2
        while rid in found and found[rid] != run:
            rid, n = f"{run.name}-{n}", n + 1
        found[rid] = run

    for p in paths:
        if (p / "config.json").is_file():
            add(p)
        elif p.is_dir():
            for child in sorted(p.iterdir()):
                if child.is_dir() and (child / "config.json").is_file():
                    add(child)
    return found


def attention_available() -> bool:
    """Whether this install can compute attention maps (PyTorch present), without importing it."""
    return importlib.util.find_spec("torch") is not None


def run_overview(rid: str, run: Path) -> dict[str, Any]:
    summary = read_json_object(run / "summary.json")
    return {"id": rid, "name": run.name, "path": str(run), "finished": summary is not None,
            "steps": (summary or {}).get("steps"), "best_val_loss": _finite((summary or {}).get("best_val_loss"))}


def run_details(rid: str, run: Path) -> dict[str, Any]:
    """Everything the run page draws, from the run folder's small files."""
    config = read_json_object(run / "config.json") or {}
    model = config.get("model") or {}
    train = config.get("train") or {}
    summary = read_json_object(run / "summary.json")
    records = read_jsonl(run / "metrics.jsonl")
    vocab = (config.get("tokenizer") or {}).get("vocab_size") or model.get("vocab_size")
    train_points = [[r["step"], _finite(r.get("loss"))] for r in records
                    if r.get("event") == "train" and isinstance(r.get("step"), int)]
    total = len(train_points)
    if total > MAX_TRAIN_POINTS:  # an even thinning that keeps the last point
        stride = math.ceil(total / MAX_TRAIN_POINTS)
        train_points = train_points[::stride] + ([train_points[-1]] if (total - 1) % stride else [])
    evals = [{"step": r["step"], "train_loss": _finite(r.get("train_loss")), "val_loss": _finite(r.get("val_loss")),
              "val_ppl": _finite(r.get("val_ppl")), "tokens_seen": r.get("tokens_seen"),
              "train_time": _finite(r.get("train_time"))}
             for r in records if r.get("event") == "eval" and isinstance(r.get("step"), int)]
    samples: dict[int, list[str]] = {}
    for r in records:
        if r.get("event") == "sample" and isinstance(r.get("step"), int) and isinstance(r.get("text"), str):
            samples.setdefault(r["step"], []).append(r["text"])
    # A run is finished once its log ends with the summary (a resumed run appends after an old one).
    finished = records[-1].get("event") == "summary" if records else summary is not None
    keep_train = ("data", "tokenizer", "vocab_size", "max_iters", "max_time", "batch_size", "tokens_per_step",
                  "learning_rate", "min_lr", "warmup_iters", "eval_interval", "dtype", "device")
    return {
        "id": rid, "name": run.name, "path": str(run),
        "model": {k: model.get(k) for k in ("arch", "n_layer", "n_head", "n_kv_head", "n_embd", "block_size",
                                            "vocab_size", "dropout") if k in model},
        "train": {k: train.get(k) for k in keep_train if k in train},
        "tokenizer": config.get("tokenizer"),
        "vocab_size": vocab,
        "log_vocab": math.log(vocab) if isinstance(vocab, int) and vocab > 0 else None,
        "has_metrics": bool(records),
        "train_points": train_points, "train_points_total": total,
        "evals": evals,
        "samples": [{"step": s, "texts": t} for s, t in sorted(samples.items())],
        "summary": summary,
        "finished": finished,
        "checkpoints": list_checkpoints(run),
        "attention": {"available": attention_available(), "needs": TRAIN_EXTRA,
                      "max_tokens": min(MAX_ATTENTION_TOKENS, int(model.get("block_size") or MAX_ATTENTION_TOKENS))},
    }


class AttentionService:
    """Loads a run's checkpoint on first use (PyTorch imported then) and computes attention maps.

    One model is kept, keyed by the checkpoint folder and its meta.json's mtime, so a page that
    asks again for the same run answers without reloading; a lock keeps two requests from
    loading at once.
    """

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._lock = threading.Lock()
        self._loaded: tuple[tuple[str, str, float], Any] | None = None

    def compute(self, run: Path, text: str, checkpoint: str) -> dict[str, Any]:
        import torch

        from nextoken.train.probe import attention_maps, encode_document
        from nextoken.train.run import load_run, pick_checkpoint

        if self.threads:
            torch.set_num_threads(self.threads)  # beside a serving engine: leave it the other cores
        with self._lock:
            ckpt = pick_checkpoint(run, checkpoint)
            meta = ckpt.path / "meta.json"
            key = (str(run), str(ckpt.path), meta.stat().st_mtime if meta.exists() else 0.0)
            if self._loaded is None or self._loaded[0] != key:
                self._loaded = None  # free the previous model before loading the next
                self._loaded = (key, load_run(run, str(ckpt.path)))
            loaded = self._loaded[1]
        ids, _ = encode_document(loaded.tokenizer, text, loaded.eot_id)
        if len(ids) > MAX_ATTENTION_TOKENS:
            raise UserError(f"is {len(ids)} tokens with the <|endoftext|> separator; the page draws at most "
                            f"{MAX_ATTENTION_TOKENS}", flag="--text")
        maps = attention_maps(loaded.model, loaded.tokenizer, text, eot_id=loaded.eot_id)
        return {"checkpoint": {"name": ckpt.path.name, "step": ckpt.step,
                               "val_loss": _finite(ckpt.meta.get("val_loss")) if ckpt.meta else None},
                "labels": maps.labels, "layers": maps.layers, "n_head": int(maps.maps[0].shape[0]),
                # per layer (n_head, T, T), rows = queries; float64 first so 4 decimals print as 4 decimals
                "maps": [m.astype("float64").round(4).tolist() for m in maps.maps]}


class RunRoutes:
    """The run page's JSON routes over ``runs()`` (id -> folder, re-read per request)."""

    def __init__(self, runs: Callable[[], dict[str, Path]], *, context: str, threads: int = 1) -> None:
        self.runs = runs
        self.context = context  # "served": the served model's run; "runs": `nextoken runs`
        self.attention = AttentionService(threads)

    def _find(self, rid: str) -> Path | None:
        return self.runs().get(rid)

    async def list_runs(self, request: Request) -> Response:
        runs = self.runs()
        return JSONResponse({"object": "list", "context": self.context,
                             "data": [run_overview(rid, p) for rid, p in runs.items()]})

    async def get_run(self, request: Request) -> Response:
        rid = request.path_params["run_id"]
        run = self._find(rid)
        if run is None:
            return _error(404, f"no run {rid!r} here", param="run_id", code="not_found")
        return JSONResponse(run_details(rid, run))

    async def post_attention(self, request: Request) -> Response:
        rid = request.path_params["run_id"]
        run = self._find(rid)
        if run is None:
            return _error(404, f"no run {rid!r} here", param="run_id", code="not_found")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return _error(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                          code="unsupported_media_type")
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"the body is not valid JSON: {e}", code="invalid_json")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object", code="invalid_type")
        text, checkpoint = body.get("text"), body.get("checkpoint", "best")
        if not isinstance(text, str) or not text:
            return _error(400, "text must be a non-empty string", param="text",
                          code="invalid_type" if not isinstance(text, str) else "invalid_value")
        if len(text) > MAX_TEXT_CHARS:
            return _error(400, f"text is {len(text)} characters; at most {MAX_TEXT_CHARS}", param="text")
        if isinstance(checkpoint, int) and not isinstance(checkpoint, bool) and checkpoint >= 0:
            checkpoint = str(checkpoint)
        if not isinstance(checkpoint, str) or not (checkpoint in ("best", "latest") or checkpoint.isdigit()):
            return _error(400, "checkpoint must be \"best\", \"latest\" or a step number", param="checkpoint")
        if not attention_available():
            return _error(501, "attention maps are computed from the checkpoint with PyTorch and the training "
                          f"code, which this install lacks: {TRAIN_EXTRA}", param=None, code="needs_train_extra")
        try:
            result = await run_in_threadpool(self.attention.compute, run, text, checkpoint)
        except UserError as e:
            message = str(e)
            if e.flag and message.startswith(f"{e.flag}: "):
                message = message[len(e.flag) + 2:]
            param = _FLAG_PARAMS.get(e.flag or "")
            return _error(400, f"{param}: {message}" if param else message, param=param)
        return JSONResponse(dict(result, run=rid))

    def mount(self, app: FastAPI) -> None:
        app.add_api_route("/api/runs", self.list_runs, methods=["GET"], include_in_schema=False)
        app.add_api_route("/api/runs/{run_id}", self.get_run, methods=["GET"], include_in_schema=False)
        app.add_api_route("/api/runs/{run_id}/attention", self.post_attention, methods=["POST"],
                          include_in_schema=False)
