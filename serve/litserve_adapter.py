"""LitServe as the server shell, confined here: its processes, its FastAPI app and uvicorn, nothing else.

What LitServe does for us: it spawns the engine process (its "inference worker", whose
``LitAPI.setup`` builds our ``EngineLoop`` and whose loop runs it), forks the HTTP process (uvicorn
over ``LitServer.app``, where the frontend's routes are mounted through a ``LitSpec``), and on stop
terminates and joins them all. What it does not do: carry our messages (we use our own pipes,
``wire.Pipes``), schedule, or read requests.

Public API used: ``LitAPI`` (``setup``, ``health``), ``LitLoop`` subclassed with ``run``,
``LitSpec.add_endpoint``, ``LitServer(...)``, ``.app`` and ``.run()``, which returns after a
``KeyboardInterrupt`` in the main thread (Ctrl-C, its documented way to stop; ``request_stop``
raises one there). The one thing LitServe defines only by example is how it calls a loop's
``run``: with the ``LitAPI`` first, then its own queues (which we ignore);
``tests/serve/test_litserve_adapter.py`` fails if that changes.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import litserve as ls
from litserve.specs.base import LitSpec

from nextoken.serve.engine.loop import EngineLoop

logger = logging.getLogger("nextoken.serve")

Route = tuple[str, Callable[..., Any], list[str]]  # (path, handler, methods)
LITSERVE_HEALTH = "/litserve/health"
STOP_SIGNAL = signal.SIGUSR1  # the launcher's own "stop now", turned into the KeyboardInterrupt LitServe expects


class EngineAPI(ls.LitAPI):
    """The engine process's entry: ``setup`` loads the model; the loop then runs the engine until stopped.

    LitServe's per-request hooks (``predict``, ``decode_request``, ``encode_response``) are not
    overridden: no request reaches them, the engine loop reads nextoken's own pipes.
    """

    def __init__(self, engine: EngineLoop, spec: LitSpec, healthy: Callable[[], bool], engine_pid: Any) -> None:
        super().__init__(max_batch_size=1, stream=True, spec=spec, loop=EngineWorkerLoop(), api_path="/v1/completions")
        self.engine = engine
        self._healthy = healthy  # runs in the HTTP process (LitServe's health route)
        self._engine_pid = engine_pid  # mp.Value the launcher watches

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_healthy"] = None  # a closure over the HTTP side's state: not needed in the engine process
        return state

    def setup(self, device: str) -> None:
        # A terminal's Ctrl-C reaches every process in the group; the main process drains, and the engine
        # must keep generating for the streams still in flight (it stops when LitServe terminates it).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._engine_pid.value = os.getpid()
        self.engine.setup()

    async def authorize(self) -> None:
        """Every route's FastAPI dependency (LitServe's public hook); the API key is ApiKeyMiddleware's job.

        LitServe's default is a plain function, which FastAPI runs in its thread pool: one thread
        hop per request, ~1 ms on a busy core and 18% of the HTTP process under a burst of 429s.
        """
        return None

    def health(self) -> bool:
        return self._healthy() if self._healthy is not None else True


class EngineWorkerLoop(ls.loops.LitLoop):
    """Runs ``EngineLoop.run_forever`` in LitServe's worker; LitServe's own queues are never read."""

    def run(self, lit_api: EngineAPI, *_litserve_queues: Any) -> None:  # type: ignore[override]
        lit_api.engine.run_forever()
        raise SystemExit(0)  # the request pipe closed: the server is stopping


class RoutesSpec(LitSpec):
    """Hands our routes to LitServe, which then mounts no ``/predict`` of its own."""

    def __init__(self, routes: list[Route]) -> None:
        super().__init__()
        self.api_path = "/v1/completions"  # LitServe keys its (unused) request queue by the LitAPI's path
        for path, handler, methods in routes:
            self.add_endpoint(path, handler, methods)

    @property
    def stream(self) -> bool:
        # Streaming routes: LitServe then adds no GZip middleware (it buffered nothing here, but cost every
        # SSE chunk a pass through it: ~9% of the HTTP process at 32 streams).
        return True

    def __getstate__(self) -> dict[str, Any]:
        # LitServe pickles the LitAPI, spec included, into the engine process, which serves no route.
        state = super().__getstate__()
        state["_endpoints"] = []
        return state

    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output


def build_server(engine: EngineLoop, routes: list[Route], *, healthy: Callable[[], bool], engine_pid: Any
                 ) -> ls.LitServer:
    spec = RoutesSpec(routes)
    api = EngineAPI(engine, spec, healthy, engine_pid)
    return ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=False,
                        healthcheck_path=LITSERVE_HEALTH, info_path="/litserve/info", disable_openapi_url=False)


def run(server: ls.LitServer, *, host: str, port: int, log_level: str) -> None:
    """Serve until ``request_stop`` (or Ctrl-C); LitServe then stops and joins every process it started."""
    previous = signal.signal(STOP_SIGNAL, _raise_interrupt)
    try:
        server.run(host=host, port=port, num_api_servers=1, log_level=log_level, generate_client_file=False,
                   pretty_logs=False)
    finally:
        signal.signal(STOP_SIGNAL, previous)


def request_stop() -> None:
    """Make ``run`` return: LitServe shuts down on a KeyboardInterrupt in the main thread."""
    os.kill(os.getpid(), STOP_SIGNAL)


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    if mp.parent_process() is None:  # only the main process stops the server; children inherit the handler
        raise KeyboardInterrupt
