"""Process lifecycle: build the LitServe server, add the operational routes, drain on signals.

Processes: this main process (signals, drain), one LitServe API process (uvicorn: HTTP,
tokenization, admission) and one inference worker (the engine). On SIGTERM or SIGINT the
server stops admitting (new requests get 503, ``/health`` turns 503), lets in-flight streams
finish up to ``drain_timeout`` seconds, then shuts LitServe down, which terminates and joins
every process it started; the metrics directory is removed last.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from nextoken import __version__
from nextoken.export.artifact import Artifact, load_artifact
from nextoken.serve.models import resolve_artifact_dir

logger = logging.getLogger("nextoken.serve")
WORKER_WATCH_S = 0.2


@dataclass
class ServeOptions:
    artifact_dir: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_queue: int = 256
    api_key_env: str | None = None
    device: str = "cpu"
    threads: int = 0
    drain_timeout: float = 30.0
    log_level: str = "warning"


def build_server(opts: ServeOptions, artifact: Artifact) -> tuple[Any, Any]:
    import litserve as ls

    from nextoken.serve.api import MODEL_KEY, RELOAD, BatchingLoop, GenerationAPI, OpenAISpec, Pipes, ServerState
    from nextoken.serve.metrics import render_latest
    from nextoken.serve.middleware import ApiKeyMiddleware, LeaveSigintToMain, install_openai_errors
    from nextoken.serve.openapi import Limits, install_openapi
    from nextoken.serve.playground import mount_playground
    from nextoken.serve.tokenize_routes import mount_tokenizer_routes

    api_key = os.environ.get(opts.api_key_env) if opts.api_key_env else None
    state = ServerState(opts.max_batch_size, opts.max_queue)
    pipes = Pipes(num_api_servers=1)
    spec = OpenAISpec(artifact_dir=str(artifact.path), state=state, pipes=pipes, log_level=opts.log_level)
    # The worker watches the path as given (e.g. models/current), so a newly published version is picked up.
    api = GenerationAPI(opts.artifact_dir, max_batch_size=opts.max_batch_size, device=opts.device,
                        threads=opts.threads, spec=spec, loop=BatchingLoop(), pipes=pipes)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=False,
                          healthcheck_path="/litserve/health", info_path="/litserve/info",
                          model_metadata={"model": artifact.model_id}, disable_openapi_url=False)
    app = server.app
    install_openai_errors(app)
    app.add_middleware(LeaveSigintToMain)
    if api_key is not None:
        def count_rejection() -> None:
            if spec.metrics is not None:
                spec.metrics.error(spec.model().id, "unauthorised")

        app.add_middleware(ApiKeyMiddleware, api_key=api_key, on_reject=count_rejection)

    def workers_ready() -> bool:
        status = {k: v for k, v in server.workers_setup_status.items() if not str(k).startswith("nextoken")}
        return bool(status) and all(getattr(v, "value", v) == "ready" for v in status.values())

    def readiness() -> Response:
        if state.worker_failed.is_set():
            return JSONResponse({"status": "failed", "error": "the inference worker died"}, status_code=503)
        if state.draining.is_set():
            return JSONResponse({"status": "draining"}, status_code=503)
        ready = workers_ready()
        return JSONResponse({"status": "ok" if ready else "loading", "model": spec.model().id if ready else None},
                            status_code=200 if ready else 503)

    @app.get("/health")
    async def health() -> Response:
        return readiness()

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: a model is loaded and the server is not draining (503 otherwise)."""
        return readiness()

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        m = spec.model()
        return JSONResponse({"object": "list", "data": [{
            "id": m.id, "object": "model", "created": m.created, "owned_by": "nextoken", "name": m.name,
            "version": m.version, "context_length": m.context, "max_model_len": m.context}]})

    @app.post("/admin/reload")
    async def reload(request: Request) -> Response:
        """Look for a new model version now (the worker also looks about once a second)."""
        spec.pipes.requests.put((spec.response_queue_id, "reload", time.monotonic(), {RELOAD: True}))
        info = dict(server.workers_setup_status.get(MODEL_KEY) or {})
        return JSONResponse({"status": "reload requested", "serving": info.get("id"),
                             "last_error": info.get("last_error")}, status_code=202)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, ctype = render_latest()
        return Response(body, media_type=ctype)

    mount_tokenizer_routes(app, spec.model, spec.error)
    install_openapi(app, lambda: Limits(context=spec.model().context, vocab_size=spec.model().vocab_size,
                                        capacity=state.max_inflight))
    mount_playground(app, spec.model, api_key_required=api_key is not None)  # last: its pages sit outside the key
    return server, state


def serve(opts: ServeOptions) -> int:
    from nextoken.serve.api import WORKER_CHECK_S
    from nextoken.serve.metrics import prepare_multiproc_dir, remove_multiproc_dir

    artifact = load_artifact(resolve_artifact_dir(opts.artifact_dir))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the API process is forked
    metrics_dir = prepare_multiproc_dir()
    server, state = build_server(opts, artifact)

    main_pid = os.getpid()

    def drain(signum: int, _frame: Any) -> None:
        if os.getpid() != main_pid:
            # A forked child (LitServe's manager, the API process) inherited this handler. SIGINT:
            # a terminal's Ctrl-C reaches the whole process group, and only this main process may
            # act on it (by draining), so children ignore it. SIGTERM: stop as if unhandled.
            if signum == signal.SIGTERM:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if state.draining.is_set():  # a second Ctrl-C / SIGTERM: stop now, without waiting
            logger.warning("signal %s again: stopping now", signal.Signals(signum).name)
            server._shutdown_event.set()
            return
        logger.warning("signal %s: draining (no new requests; up to %.0fs for %d in flight)",
                       signal.Signals(signum).name, opts.drain_timeout, state.inflight.value)
        state.draining.set()

        def wait_then_stop() -> None:
            deadline = time.monotonic() + opts.drain_timeout
            while state.inflight.value > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            server._shutdown_event.set()

        threading.Thread(target=wait_then_stop, daemon=True, name="drain").start()

    def watch_workers() -> None:
        """A worker that dies (killed, out of memory, a crash in native code) fails the server fast.

        LitServe notices too, but leaves in-flight requests waiting and exits 0. Here the API side
        answers them with errors (it polls ``worker_failed``), /health turns 503, and the process
        exits 1 so a supervisor restarts it.
        """
        while not server_done.wait(WORKER_WATCH_S):
            workers = list(getattr(server, "inference_workers", []))
            if state.draining.is_set() or not workers or all(w.is_alive() for w in workers):
                continue
            logger.error("the inference worker died (exit code %s); failing in-flight requests and stopping",
                         [w.exitcode for w in workers])
            state.worker_failed.set()
            time.sleep(2 * WORKER_CHECK_S)  # time for the API process to answer what was in flight
            server._shutdown_event.set()
            return

    server_done = threading.Event()
    threading.Thread(target=watch_workers, daemon=True, name="worker-watch").start()
    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    print(f"nextoken {__version__} serving {artifact.model_id} on http://{opts.host}:{opts.port} "
          f"(max batch {opts.max_batch_size}, queue {opts.max_queue}, {opts.device})", flush=True)
    try:
        server.run(host=opts.host, port=opts.port, num_api_servers=1, log_level=opts.log_level,
                   generate_client_file=False, pretty_logs=False)
    finally:
        server_done.set()
        remove_multiproc_dir(Path(metrics_dir))
    return 1 if state.worker_failed.is_set() else 0
