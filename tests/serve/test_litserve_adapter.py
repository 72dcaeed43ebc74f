"""LitServe is used through its public API, except for one thing it defines only by example: how it
calls a custom loop. These tests fail when LitServe changes what the adapter relies on."""

from __future__ import annotations

import inspect

import litserve as ls
from litserve.loops import loops as ls_worker
from litserve.loops.base import _BaseLoop
from litserve.specs.base import LitSpec

from nextoken.serve import litserve_adapter


def test_a_loop_is_called_with_the_lit_api_first() -> None:
    """EngineWorkerLoop.run(lit_api, *queues): LitServe's worker calls loop(lit_api, ...) and the loop's
    __call__ calls run(lit_api, ...)."""
    call = list(inspect.signature(_BaseLoop.__call__).parameters)
    run = list(inspect.signature(ls.loops.LitLoop.run).parameters)
    assert call[:2] == ["self", "lit_api"] and run[:2] == ["self", "lit_api"]
    worker = inspect.getsource(ls_worker.inference_worker)
    assert "lit_api.setup(device)" in worker and "loop(\n        lit_api," in worker


def test_the_public_pieces_the_adapter_uses_exist() -> None:
    assert {"add_endpoint", "endpoints", "decode_request", "encode_response"} <= set(dir(LitSpec))
    assert {"setup", "health", "predict", "decode_request", "encode_response"} <= set(dir(ls.LitAPI))
    params = inspect.signature(ls.LitServer.__init__).parameters
    assert {"accelerator", "devices", "workers_per_device", "timeout", "healthcheck_path", "info_path",
            "disable_openapi_url"} <= set(params)
    run = inspect.signature(ls.LitServer.run).parameters
    assert {"host", "port", "num_api_servers", "log_level", "generate_client_file", "pretty_logs"} <= set(run)
    # run() returns after a KeyboardInterrupt in the main thread: how request_stop() ends the server
    assert "except KeyboardInterrupt" in inspect.getsource(ls.LitServer.run)


def test_the_spec_sends_no_routes_to_the_engine_process() -> None:
    async def handler() -> None:  # pragma: no cover - never called
        pass

    spec = litserve_adapter.RoutesSpec([("/x", handler, ["POST"])])
    assert spec.endpoints == [("/x", handler, ["POST"])]
    assert spec.__getstate__()["_endpoints"] == []
