"""The launcher: the server's processes, its signals, drain and a dead engine.

Processes: this main process (signals, drain, watching the engine), the engine process (the
model, its cache and the scheduler: ``engine_loop``) and one HTTP process (uvicorn: OpenAI
routes, tokenization, admission: ``frontend``), the last two started by LitServe
(``litserve_adapter``). The artifact is read and hash-checked once, here.

On SIGTERM or SIGINT (Ctrl-C signals the whole process group; the children leave it to this
process) the server stops admitting (new requests get 503, ``/ready`` turns 503), lets in-flight
streams finish up to ``drain_timeout`` seconds, then has LitServe stop and join every process; a
second signal stops at once. If the engine process dies, in-flight requests get an error at once,
``/health`` and ``/ready`` turn 503, and the server exits 1 so a supervisor restarts it. The
metrics directory is removed last.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from nextoken import __version__
from nextoken.errors import UserError
from nextoken.export.artifact import ArtifactError, load_artifact, resolve_artifact_dir
from nextoken.export.runtime import default_threads, physical_cores
from nextoken.serve import memory
from nextoken.serve.config import ServeConfig

if TYPE_CHECKING:
    from fastapi import FastAPI

    from nextoken.serve.http.playground import ServedModelView

logger = logging.getLogger("nextoken.serve")
WATCH_S = 0.2  # how often the main process looks whether the engine process is alive
# Something a caller adds to the HTTP app (routes, pages), given the app and the served model (per request).
Mount = Callable[["FastAPI", Callable[[], "ServedModelView"]], None]


def cache_bytes(config: ServeConfig, artifact_config: dict[str, Any]) -> int:
    """The KV cache's size for these flags (what ``Runner`` will allocate)."""
    return memory.plan(config, artifact_config, 0).kv_cache_bytes


def weights_label(artifact: Any) -> str:
    q = artifact.manifest.get("export", {}).get("quantize", "none")
    return str(artifact.config.get("torch_dtype", "float32")).replace("float", "fp") if q == "none" else q


def startup_line(config: ServeConfig, artifact: Any, plan: memory.MemoryPlan) -> str:
    """What the server holds and how it computes, before anything is loaded (the engine adds its budget)."""
    threads = resolved_threads(config, plan.weights_bytes)
    rule = "--threads" if config.threads else f"{physical_cores()} physical cores"
    if not config.threads and threads < default_threads():
        rule += f", a model of {plan.weights_bytes / memory.MIB:,.1f} MiB"
    return (f"nextoken {__version__} serving {artifact.model_id} on http://{config.host}:{config.port}\n"
            f"  memory: {plan.describe()} ({weights_label(artifact)} weights)\n"
            f"  compute: {config.device}, {threads} ONNX Runtime threads ({rule}); max batch "
            f"{config.max_batch_size}, queue {config.max_queue}")


def resolved_threads(config: ServeConfig, weights_bytes: int) -> int:
    """``--threads``, else the default rule for this machine and a model of ``weights_bytes``."""
    return config.threads or default_threads(weights_bytes=weights_bytes)


def serve(config: ServeConfig, mounts: Sequence[Mount] = ()) -> int:
    """Run the server until it is stopped; the exit status (1: the engine process died).

    ``mounts`` are called in this process after the API-key middleware and the playground's
    pages are installed, so middleware a mount adds sits outermost (as pages must, see
    ``http.playground``).
    """
    from nextoken.serve import litserve_adapter
    from nextoken.serve.engine.loop import EngineLoop
    from nextoken.serve.http.chat import ChatTemplateError
    from nextoken.serve.http.engine_client import SharedState
    from nextoken.serve.http.frontend import Frontend
    from nextoken.serve.metrics import prepare_multiproc_dir
    from nextoken.serve.wire import Pipes

    try:
        artifact = load_artifact(resolve_artifact_dir(config.artifact_dir))  # the one hash check at start-up
    except (ArtifactError, OSError) as e:
        raise UserError(str(e), flag="ARTIFACT_DIR") from None
    context = int(artifact.config["n_positions"])
    if config.max_model_len > context:
        raise UserError(f"must be <= the model's context ({context}), got {config.max_model_len}",
                        flag="--max-model-len")
    if not (artifact.path / "serving.onnx").is_file():
        raise UserError(f"{artifact.path} has no serving graph (serving.onnx): it was exported by an older nextoken; "
                        "export it again with `nextoken export RUN --out ...`", flag="ARTIFACT_DIR")
    draft = None
    if config.draft_model:  # refused here, by name, rather than by the engine process after the fork
        from nextoken.serve.engine.draft import check_draft

        try:
            draft = load_artifact(resolve_artifact_dir(config.draft_model))
            check_draft(artifact, draft)
        except (ArtifactError, OSError, ValueError) as e:
            raise UserError(str(e).removeprefix("--draft-model "), flag="--draft-model") from None
    # Memory is planned and checked before anything is loaded: the cache is allocated whole at start-up.
    plan = memory.plan(config, artifact.config, memory.weights_bytes(artifact.path))
    if draft is not None:
        plan = memory.with_draft(plan, draft.config, draft.path)
    if config.device == "cpu":
        memory.check_fits(plan, memory.available_bytes())
    config = memory.apply(config, plan)
    line = startup_line(config, artifact, plan)
    if config.device == "cpu":  # the engine runs with the count the line shows
        config = dataclasses.replace(config, threads=resolved_threads(config, plan.weights_bytes))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the HTTP process is forked
    metrics_dir = prepare_multiproc_dir(compat=config.metrics_compat)
    pipes = Pipes(num_frontends=1)
    state = SharedState(config.max_inflight)
    engine_pid = mp.get_context("spawn").Value("i", 0)  # read here, written by the (spawned) engine process
    try:
        frontend = Frontend(config, pipes, state, artifact)
    except ChatTemplateError as e:
        raise UserError(str(e), flag="--chat-template") from None
    try:
        frontend.model()  # the tokenizer and chat template, read once here (the forked HTTP process inherits them)
    except ChatTemplateError as e:
        raise UserError(f"{artifact.path}: {e}; serve it with --chat-template FILE", flag="ARTIFACT_DIR") from None
    # The engine watches the path as given (e.g. models/current), so a newly published version is picked up.
    engine = EngineLoop(config, pipes, verified=artifact)
    server = litserve_adapter.build_server(engine, frontend.routes(), healthy=frontend.ready, engine_pid=engine_pid)
    frontend.install(server.app)
    for mount in mounts:  # after the API-key middleware: what they add answers in front of it (see playground.py)
        mount(server.app, frontend.model)

    main_pid = os.getpid()

    def drain(signum: int, _frame: Any) -> None:
        if os.getpid() != main_pid:
            # A forked child (LitServe's manager, the HTTP process) inherited this handler. SIGINT: a
            # terminal's Ctrl-C reaches the whole process group, and only this process acts on it (by
            # draining), so children ignore it. SIGTERM: stop as if unhandled.
            if signum == signal.SIGTERM:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if state.draining.is_set():  # a second Ctrl-C / SIGTERM: stop now, without waiting
            logger.warning("signal %s again: stopping now", signal.Signals(signum).name)
            litserve_adapter.request_stop()
            return
        logger.warning("signal %s: draining (no new requests; up to %.0fs for %d in flight)",
                       signal.Signals(signum).name, config.drain_timeout, state.inflight.value)
        state.draining.set()

        def wait_then_stop() -> None:
            deadline = time.monotonic() + config.drain_timeout
            while state.busy() and time.monotonic() < deadline:
                time.sleep(0.05)
            litserve_adapter.request_stop()

        threading.Thread(target=wait_then_stop, daemon=True, name="drain").start()

    def watch_engine() -> None:
        """An engine process that dies (killed, out of memory, a crash in native code) fails the server fast."""
        while not server_done.wait(WATCH_S):
            pid = engine_pid.value
            if not pid or state.draining.is_set():
                continue
            if any(p.pid == pid for p in mp.active_children()):
                continue
            logger.error("the engine process (pid %d) died; failing in-flight requests and stopping", pid)
            state.engine_failed.set()
            time.sleep(2 * config.engine_check_s)  # time for the HTTP process to answer what was in flight
            litserve_adapter.request_stop()
            return

    server_done = threading.Event()
    threading.Thread(target=watch_engine, daemon=True, name="engine-watch").start()
    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    print(line, flush=True)
    try:
        litserve_adapter.run(server, host=config.host, port=config.port, log_level=config.log_level)
    finally:
        server_done.set()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 1 if state.engine_failed.is_set() else 0
