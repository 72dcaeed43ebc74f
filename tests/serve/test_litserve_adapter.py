"""LitServe is used through its public API, except for one thing it defines only by example: how it
calls a custom loop. These tests fail when LitServe changes what the adapter relies on."""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import queue
import threading

import litserve as ls
from litserve.callbacks.base import CallbackRunner
from litserve.loops import loops as ls_worker
from litserve.specs.base import LitSpec

from nextoken.serve import litserve_adapter


class _Engine:
    """Stands in for EngineLoop: records what LitServe's worker made the adapter do."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def setup(self) -> None:
        self.calls.append("setup")

    def run_forever(self) -> None:
        self.calls.append("run_forever")


def test_litserves_worker_runs_the_engine_through_the_adapters_loop() -> None:
    """LitServe's own inference worker, given the adapter's LitAPI, sets the engine up and runs it.

    It calls the loop as loop(lit_api, *its queues), which LitServe defines only by example; if it
    passed something else first, the loop would not find the engine and this fails.
    """
    engine = _Engine()
    api = litserve_adapter.EngineAPI(engine, litserve_adapter.RoutesSpec([]), lambda: True, mp.Value("i", 0))
    exits: list[BaseException] = []

    def worker() -> None:  # a thread of its own: the adapter ignores SIGINT only in a main thread
        try:
            ls_worker.inference_worker(api, "cpu", 0, queue.Queue(), None, {}, CallbackRunner(), False)
        except SystemExit as e:
            exits.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join(30)
    assert engine.calls == ["setup", "run_forever"]
    assert len(exits) == 1 and exits[0].code == 0  # the loop ends the worker once the engine returns
    assert api._engine_pid.value == os.getpid()  # the launcher watches this pid


def test_the_public_pieces_the_adapter_uses_exist() -> None:
    assert {"add_endpoint", "endpoints", "decode_request", "encode_response"} <= set(dir(LitSpec))
    assert {"setup", "health", "predict", "decode_request", "encode_response"} <= set(dir(ls.LitAPI))
    params = inspect.signature(ls.LitServer.__init__).parameters
    assert {"accelerator", "devices", "workers_per_device", "timeout", "healthcheck_path", "info_path",
            "disable_openapi_url"} <= set(params)
    run = inspect.signature(ls.LitServer.run).parameters
    assert {"host", "port", "num_api_servers", "log_level", "generate_client_file", "pretty_logs"} <= set(run)
    # run() returning after a KeyboardInterrupt (how request_stop() ends the server) is what the drain
    # tests in test_server.py see: the server exits 0 with every process gone.


def test_the_spec_sends_no_routes_to_the_engine_process() -> None:
    async def handler() -> None:  # pragma: no cover - never called
        pass

    spec = litserve_adapter.RoutesSpec([("/x", handler, ["POST"])])
    assert spec.endpoints == [("/x", handler, ["POST"])]
    assert spec.__getstate__()["_endpoints"] == []
