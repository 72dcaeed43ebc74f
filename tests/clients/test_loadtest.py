"""Load-tester arithmetic on known timings, workload parsing, and a short CLI run against the
scripted server (JSON and PNGs produced). numpy, when present, cross-checks the percentiles."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nextoken_client.loadtest import ErrorDetail, RequestRecord, percentile, summarize
from nextoken_client.loadtest.cli import main
from nextoken_client.loadtest.report import format_table
from nextoken_client.loadtest.workload import LengthSpec, file_workload, synthetic_workload
from tests.clients.fakeserver import Reply, Script


def test_percentile_interpolates_like_numpy() -> None:
    values = [random.Random(s).uniform(0, 100) for s in range(37)]
    np = pytest.importorskip("numpy")
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summary_of_known_timings() -> None:
    """Hand-computed: two successes of 5 and 3 tokens, one 429, over 2 s."""
    a = RequestRecord(ok=True, latency=1.0, ttft=0.2, itl=[0.2, 0.2, 0.2, 0.2], prompt_tokens=10, output_tokens=5)
    b = RequestRecord(ok=True, latency=0.5, ttft=0.1, itl=[0.1, 0.3], prompt_tokens=6, output_tokens=3)
    c = RequestRecord(ok=False, latency=0.01, error="OverloadedError(429)")
    s = summarize([a, b, c], 2.0, concurrency=2, slo_ms={"ttft": 150, "tpot": 250})
    assert (s.completed, s.failed, s.failures) == (2, 1, {"OverloadedError(429)": 1})
    assert (s.total_input_tokens, s.total_output_tokens) == (16, 8)
    assert (s.request_throughput, s.output_throughput, s.total_token_throughput) == (1.0, 4.0, 12.0)
    assert s.ttft_ms is not None and s.ttft_ms["mean"] == pytest.approx(150.0)
    # TPOT: a = (1.0 - 0.2) / 4 = 0.2 s, b = (0.5 - 0.1) / 2 = 0.2 s.
    assert s.tpot_ms is not None and s.tpot_ms["p50"] == pytest.approx(200.0)
    # ITL pools all six gaps: median 0.2 s, max 0.3 s.
    assert s.itl_ms is not None and s.itl_ms["p50"] == pytest.approx(200.0) and s.itl_ms["p99"] > 290
    assert s.e2el_ms is not None and s.e2el_ms["mean"] == pytest.approx(750.0)
    # Only b meets TTFT <= 150 ms (a's is 200 ms); both meet TPOT; c failed: goodput 1 / 2 s.
    assert s.goodput == 0.5 and s.level == "concurrency=2"


def test_single_token_requests_have_no_tpot_and_errors_are_named() -> None:
    s = summarize([RequestRecord(ok=True, latency=0.3, ttft=0.3, output_tokens=1)], 1.0, request_rate=4.0)
    assert s.tpot_ms is None and s.itl_ms is None and s.level == "rate=4"
    with pytest.raises(ValueError, match="unknown SLO"):
        summarize([], 1.0, slo_ms={"latency": 1.0})


def test_failures_are_grouped_with_the_servers_message() -> None:
    """Identical failures make one line with their count; the console shows the five most frequent."""
    too_long = ErrorDetail("max_tokens too large", "invalid_request_error", "max_tokens", "context_length_exceeded")
    records = [RequestRecord(ok=False, error="ValidationError(400)", error_detail=too_long)] * 3
    records += [RequestRecord(ok=False, error="StreamError", error_detail=ErrorDetail(f"cut after {i} events"))
                for i in range(6)]
    records += [RequestRecord(ok=False, error="OverloadedError(429)"), RequestRecord(ok=True, latency=0.1)]
    s = summarize(records, 1.0, concurrency=1)
    assert s.failures == {"ValidationError(400)": 3, "StreamError": 6, "OverloadedError(429)": 1}
    assert s.failure_details[0] == {"kind": "ValidationError(400)", "count": 3, "message": "max_tokens too large",
                                    "type": "invalid_request_error", "param": "max_tokens",
                                    "code": "context_length_exceeded"}
    assert len(s.failure_details) == 8 and {"kind": "OverloadedError(429)", "count": 1, "message": None, "type": None,
                                            "param": None, "code": None} in s.failure_details
    lines = format_table([s]).splitlines()
    at = lines.index("failures at concurrency=1: 10 of 11 requests")
    assert lines[at + 1] == ("  3 x ValidationError(400): max_tokens too large (type: invalid_request_error, "
                             "param: max_tokens, code: context_length_exceeded)")
    assert lines[at + 2] == "  1 x OverloadedError(429)"
    assert lines[at + 3].startswith("  1 x StreamError: cut after ")
    assert lines[at + 6:] == ["  ... 3 more distinct failures (3 requests); --json-out lists them all"]


def test_length_specs() -> None:
    rng = random.Random(0)
    assert LengthSpec.parse("16", "--x").draw(rng) == 16
    assert {LengthSpec.parse("uniform:3:5", "--x").draw(rng) for _ in range(200)} == {3, 4, 5}
    normal = [LengthSpec.parse("normal:50:5", "--x").draw(rng) for _ in range(2000)]
    assert 49 < sum(normal) / len(normal) < 51 and min(normal) >= 1
    for bad in ("0", "uniform:5:3", "gauss:1:2", "x"):
        with pytest.raises(ValueError, match="--x"):
            LengthSpec.parse(bad, "--x")


def test_workloads_are_seeded_and_files_cycle(tmp_path: Path) -> None:
    spec, out = LengthSpec.parse("uniform:4:8", "-"), LengthSpec.parse("7", "-")
    first = synthetic_workload(5, spec, out, seed=1)
    assert first == synthetic_workload(5, spec, out, seed=1) != synthetic_workload(5, spec, out, seed=2)
    assert all(4 <= len(w.prompt.split()) <= 8 and w.max_tokens == 7 for w in first)
    f = tmp_path / "p.txt"
    f.write_text('plain prompt\n\n{"prompt": "json prompt", "max_tokens": 3}\n', encoding="utf-8")
    items = file_workload(f, 5, out, seed=0)
    assert [(w.prompt, w.max_tokens) for w in items[:3]] == [("plain prompt", 7), ("json prompt", 3),
                                                              ("plain prompt", 7)]
    f.write_text('{"no_prompt": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="p.txt:1"):
        file_workload(f, 1, out, seed=0)


class Busy(Script):
    """Streams 6 tokens per request, but every 5th request is refused with a 429."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.lock = threading.Lock()

    def next(self) -> Reply:
        with self.lock:
            self.count += 1
            if self.count % 5 == 0:
                return Reply(status=429, headers={"retry-after": "1"}, body={"error": {"message": "queue full"}})
        return Reply(pieces=["t"] * 6)


@pytest.fixture
def busy_server() -> Iterator[str]:
    from tests.clients.fakeserver import serve
    from tests.conftest import free_port

    gen = serve(Busy(), free_port())
    yield next(gen)
    gen.close()


def test_cli_sweep_writes_json_and_plots(busy_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    rc = main(["--base-url", busy_server, "--concurrency", "1,3", "--num-requests", "10", "--warmup", "0",
               "--slo", "ttft=5000", "--json-out", str(tmp_path / "r.json"), "--plot-dir", str(tmp_path / "plots"),
               "--no-progress"])
    assert rc == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    levels = doc["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 3]
    # 20 requests in all, every 5th refused: 4 failures counted (not retried away), 16 completions.
    assert sum(lv["failed"] for lv in levels) == 4 and sum(lv["completed"] for lv in levels) == 16
    assert all(set(lv["failures"]) <= {"OverloadedError(429)"} for lv in levels)
    assert all(lv["total_output_tokens"] == 6 * lv["completed"] for lv in levels)
    assert all(lv["tpot_ms"] is not None and lv["goodput"] == pytest.approx(lv["request_throughput"]) for lv in levels)
    for name in ("throughput.png", "ttft_p99.png", "latency_distribution.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "TTFT p99 (ms)" in table and "concurrency=3" in table and "OverloadedError(429)" in table


def test_cli_open_loop_and_unreachable_url(busy_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--base-url", busy_server, "--request-rate", "200", "--max-concurrency", "2",
                 "--num-requests", "6", "--warmup", "1", "--no-progress"]) == 0
    assert "rate=200" in capsys.readouterr().out
    from tests.conftest import free_port

    assert main(["--base-url", f"http://127.0.0.1:{free_port()}", "--num-requests", "1"]) == 2
    assert "APIConnectionError" in capsys.readouterr().err


def test_send_one_times_a_known_stall(fake: tuple[str, Script]) -> None:
    """The server stalls 0.3 s after the first of 4 tokens: exactly one ITL gap holds the stall,
    TTFT does not, and TPOT spreads it over the 3 later tokens."""
    import asyncio

    from nextoken_client import AsyncClient
    from nextoken_client.loadtest.runner import send_one
    from nextoken_client.loadtest.workload import WorkItem

    url, script = fake
    script.replies.append(Reply(pieces=["a", "b", "c", "d"], stall=0.3))

    async def run() -> RequestRecord:
        async with AsyncClient(url) as client:
            return await send_one(client, WorkItem("p", 4), {})

    r = asyncio.run(run())
    assert r.ok and r.output_tokens == 4 and r.prompt_tokens == 1 and len(r.itl) == 3
    assert r.ttft is not None and r.ttft < 0.25
    # Reading the first token late (the fake server shares this process, on a loaded machine)
    # shortens the gap the client sees by as much, so the stall shows as a little under 0.3 s.
    assert sorted(r.itl)[-1] >= 0.25 and sorted(r.itl)[1] < 0.1
    assert r.tpot is not None and 0.25 / 3 <= r.tpot <= (r.latency - r.ttft) / 3 + 1e-9


@pytest.mark.parametrize("argv", [["--slo", "latency=5"], ["--concurrency", "0"], ["--output-len", "uniform:9:2"],
                                  ["--concurrency", "2", "--request-rate", "1"]])
def test_cli_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--base-url", "http://127.0.0.1:9", *argv])
    assert info.value.code == 2 and capsys.readouterr().err


def test_cli_prints_and_saves_the_servers_error(fake: tuple[str, Script], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    url, script = fake
    message = "prompt (9 tokens) + max_tokens (600) = 609 exceeds this model's context of 512 tokens"
    error = {"error": {"message": message, "type": "invalid_request_error", "param": "max_tokens",
                       "code": "context_length_exceeded"}}
    script.replies += [Reply(status=400, body=error) for _ in range(3)]
    rc = main(["--base-url", url, "--concurrency", "1", "--num-requests", "3", "--warmup", "0", "--output-len", "600",
               "--json-out", str(tmp_path / "sweep.json"), "--no-progress"])
    assert rc == 1  # nothing completed
    out = capsys.readouterr().out
    assert ("  3 x ValidationError(400): " + message + " (type: invalid_request_error, param: max_tokens, "
            "code: context_length_exceeded)") in out.splitlines()
    level = json.loads((tmp_path / "sweep.json").read_text())["levels"][0]
    assert level["failures"] == {"ValidationError(400)": 3}
    assert level["failure_details"] == [{"kind": "ValidationError(400)", "count": 3, "message": message,
                                         "type": "invalid_request_error", "param": "max_tokens",
                                         "code": "context_length_exceeded"}]
