"""guidellm, the load tester vLLM's docs recommend, runs against ``nextoken serve`` without one errored request.

guidellm's OpenAI backend sends what it sends vLLM: ``stream_options: {include_usage, continuous_usage_stats}``
and ``stop: null`` on every streaming request, ``ignore_eos`` with ``max_tokens`` (text),
``max_completion_tokens`` (chat) or ``max_output_tokens`` (its Responses API backend). Its tokenizer is
the artifact folder itself (``tokenizer.json`` + ``tokenizer_config.json`` load as a Hugging Face
tokenizer). Each route runs a short concurrent benchmark on synthetic text; the report must count
exactly what the server counted: every request's output tokens as asked, and the report's input,
output and cached tokens equal to what the server's own counters (/metrics) grew by meanwhile,
which are the usage the server answered with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, metric

pytest.importorskip("guidellm", reason="guidellm is in the test extra (pip install -e '.[test]')")

REQUESTS = 12
STREAMS = 4
PROMPT_TOKENS = OUTPUT_TOKENS = 32
COUNTERS = ("nextoken_prompt_tokens_total", "nextoken_generation_tokens_total", "nextoken_prefix_cache_hits_total")


@pytest.fixture(scope="module")
def server(serve_artifact: Path) -> Iterator[ServerProcess]:
    # the 512-token char model: 32 synthetic prompt tokens + the chat template + 32 output tokens fit
    s = ServerProcess(serve_artifact, "--max-batch-size", "8", "--max-queue", "8")
    yield s
    s.stop()


def counters(s: ServerProcess, model: str) -> list[float]:
    return [metric(s.url, name, model=model) for name in COUNTERS]


# ~30 s a run (guidellm's start-up, mostly): chat and text here; its /v1/responses backend passes as well
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_guidellm_benchmark_has_no_errors_and_counts_what_the_server_counted(
        server: ServerProcess, serve_artifact: Path, tmp_path: Path, route: str) -> None:
    model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    out = tmp_path / "report.json"
    before = counters(server, model)
    cmd = [sys.executable, "-m", "guidellm", "run",
           "--backend", f"kind=openai_http,target={server.url},model={model},request_format={route}",
           "--profile", f"kind=concurrent,streams={STREAMS}",
           "--constraint", f"kind=max_requests,count={REQUESTS}",
           "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
           "--tokenizer", f"kind=huggingface_auto,model={serve_artifact}",
           "--output", f"kind=json,path={out}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "NO_COLOR": "1"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    after = counters(server, model)
    requests = json.loads(out.read_text())["benchmarks"][0]["requests"]
    assert not requests["errored"] and not requests["incomplete"], (requests["errored"] or requests["incomplete"])[0]
    done = requests["successful"]
    assert len(done) == REQUESTS
    outputs = [r["output_metrics"]["text_tokens"] for r in done]
    assert outputs == [OUTPUT_TOKENS] * REQUESTS  # ignore_eos and the route's own max-tokens field, honoured
    grew = [b - a for a, b in zip(before, after, strict=True)]
    assert sum(r["input_metrics"]["text_tokens"] for r in done) == grew[0]
    assert sum(outputs) == grew[1]
    assert sum(r["input_metrics"]["cached_tokens"] or 0 for r in done) == grew[2]
