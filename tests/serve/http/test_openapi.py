"""The OpenAPI document is the truth: schemathesis fuzzes the real server from its own /openapi.json.

Every operation in the document is called with cases generated from it: schema-valid ones
(positive) and schema-violating ones (negative, which the server must refuse with a 4xx). Every
answer must be a declared status with a declared media type, headers and a body matching the
declared model (a stream: every event a documented chunk, each choice finished once, ``[DONE]``
last; a Responses API stream: every event a documented typed event, in order, ending with
response.completed / response.incomplete / error), never a 5xx and never slow. The generation routes
get at least ``GENERATION_CASES`` cases between them, and those cases must have carried every field
of their request models.

The server runs the tiny 32-token-context model, so the document's own max_tokens bound (the
context) keeps every generation short; nothing is narrowed for the fuzzer.

schemathesis' pytest plugin (``from_fixture``) fails on pytest 9 (it reads ``Function._nodeid``),
so the cases are drawn with hypothesis directly from each operation's strategy, and failures are
collected over the whole run and reported together.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from jsonschema import Draft202012Validator  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

SEED = 20261202
GENERATION_EXAMPLES = 300  # per route and mode: more fields than before (vLLM's), each must be sent once
RESPONSES_EXAMPLES = 120  # per mode: fewer fields, most of them refusals
OTHER_EXAMPLES = 40  # per other operation and mode
GENERATION_CASES = 1000
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
REQUEST_MODELS = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest",
                  "/v1/responses": "ResponsesRequest"}
RESPONSES_LAST = ("response.completed", "response.incomplete", "error")
SLOW_S = 10.0  # generous: one case is at most 31 tokens x 16 choices on a tiny model


@pytest.fixture(scope="module")
def fuzz_server(tiny_artifact: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(tiny_artifact, "--max-batch-size", "8", "--max-queue", "8")
    yield s
    s.stop()


def not_slow(ctx: object, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    if response.elapsed > SLOW_S:
        raise AssertionError(f"answered in {response.elapsed:.1f} s (bound {SLOW_S} s)")
    return None


def streams_conform(ctx: object, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """Every event of a stream is a documented chunk (or error), each choice finishes once, [DONE] comes once, last.

    schemathesis checks each event's envelope; the chunk inside ``data`` is JSON in a string, checked here
    against the same document's model.
    """
    ctype = response.headers.get("content-type") or [""]
    if response.status_code != 200 or not str(ctype[0]).startswith("text/event-stream"):
        return None
    doc = case.operation.schema.raw_schema
    assert not getattr(response, "stream_cut_short", False), "schemathesis stopped reading the stream"
    if case.path == "/v1/responses":
        return responses_stream_conforms(response.content.decode(), doc)
    name = {"/v1/completions": "CompletionChunk", "/v1/chat/completions": "ChatCompletionChunk"}[case.path]
    validator = Draft202012Validator({"anyOf": [{"$ref": f"#/components/schemas/{name}"},
                                                {"$ref": "#/components/schemas/ErrorResponse"}],
                                      "components": doc["components"]})
    events = [line[len("data: "):] for line in response.content.decode().splitlines() if line.startswith("data: ")]
    finished: Counter = Counter()
    for i, data in enumerate(events):
        if data == "[DONE]":
            assert i == len(events) - 1, "[DONE] before the end of the stream"
            continue
        obj = json.loads(data)
        errors = sorted(validator.iter_errors(obj), key=str)
        assert not errors, f"event {i} does not match {name}: {errors[0].message}"
        if "error" in obj:
            return None  # a mid-stream failure ends the stream without [DONE]
        finished.update(c["index"] for c in obj["choices"] if c["finish_reason"] is not None)
    assert events and events[-1] == "[DONE]", "the stream did not end with [DONE]"
    assert all(n == 1 for n in finished.values()), f"a choice finished more than once: {dict(finished)}"
    return None


def responses_stream_conforms(text: str, doc: dict) -> None:
    """Each ``event:`` names the type of its ``data:`` event, which matches the documented event model; sequence
    numbers count from 0; the first is response.created and the last is terminal."""
    validator = Draft202012Validator({"$ref": "#/components/schemas/ResponseStreamEvent",
                                      "components": doc["components"]})
    blocks = [b for b in text.split("\n\n") if b.strip()]
    events = []
    for i, block in enumerate(blocks):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        obj = json.loads(fields["data"])
        errors = sorted(validator.iter_errors(obj), key=str)
        assert not errors, f"event {i} does not match ResponseStreamEvent: {errors[0].message}"
        assert fields["event"] == obj["type"] and obj["sequence_number"] == i, (i, fields["event"], obj)
        events.append(obj["type"])
    assert events[0] == "response.created" or events == ["error"], events
    assert events[-1] in RESPONSES_LAST and not any(e in RESPONSES_LAST for e in events[:-1]), events


def fuzz(url: str, generation_examples: int,
         other_examples: int) -> tuple[Counter, dict[str, set[str]], dict[str, str]]:
    """Run every operation's positive and negative cases; returns (cases per (path, mode), fields sent, failures)."""
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        # 413 (a body over 1 MiB, e.g. more messages than maxItems allows) is a rejection too
        "checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 404, 405, 413, 415, 422, 429]}},
        # schemathesis stops reading a stream after 20 events by default; ours are bounded (choices x context)
        # and streams_conform needs each whole, up to [DONE]
        "max-stream-events": 100_000,
    })
    api = schemathesis.openapi.from_url(url + "/openapi.json", config=config)
    checks = [getattr(schemathesis.checks, name) for name in (
        "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
        "response_headers_conformance", "negative_data_rejection")] + [not_slow, streams_conform]
    cases: Counter = Counter()
    fields: dict[str, set[str]] = {p: set() for p in GENERATION_ROUTES}
    failures: dict[str, str] = {}  # a short key per distinct failure -> its report

    def runner(op: schemathesis.APIOperation, mode: GenerationMode, examples: int) -> None:
        @seed(SEED)
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            cases[(case.path, mode.value)] += 1
            if case.path in fields and isinstance(case.body, dict):
                fields[case.path].update(case.body)
            try:
                case.call_and_validate(checks=checks, timeout=60)
            except BaseException as e:  # collected (schemathesis' FailureGroup is a BaseExceptionGroup)
                if isinstance(e, KeyboardInterrupt | SystemExit):
                    raise
                titles = [ln.strip() for ln in str(e).splitlines() if ln.startswith("- ")] or [type(e).__name__]
                failures.setdefault(f"{case.method} {case.path} {mode.value}: {'; '.join(titles)}", str(e)[:3000])

        run()

    operations = [r.ok() for r in api.get_all_operations()]
    assert {op.path for op in operations} >= {*GENERATION_ROUTES, "/tokenize", "/detokenize", "/tokenizer_info",
                                              "/apply-template",
                                              "/v1/models", "/health", "/ready", "/metrics", "/admin/reload"}
    for op in operations:
        raw = op.definition.raw
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode == GenerationMode.NEGATIVE and "requestBody" not in raw and not raw.get("parameters"):
                continue  # nothing to negate: no parameters, no body
            examples = {"/v1/responses": min(generation_examples, RESPONSES_EXAMPLES)}.get(
                op.path, generation_examples if op.path in GENERATION_ROUTES else other_examples)
            runner(op, mode, examples)
    return cases, fields, failures


@pytest.fixture
def seed_alone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The seed alone decides the cases. Hypothesis mixes constants it finds in this project's imported modules
    into 5% of its draws, so the cases changed with whichever tests had run before in the process (a full run
    once left /v1/chat/completions' top_k unsent); here it sees none, and its cache of them starts empty."""
    from hypothesis.internal.conjecture import providers
    from hypothesis.internal.constants_ast import Constants

    monkeypatch.setattr(providers, "_get_local_constants", Constants)
    providers.CONSTANTS_CACHE.cache.clear()
    yield
    providers.CONSTANTS_CACHE.cache.clear()


@pytest.mark.timeout(1200)  # ~1100 cases through a real server: 2-4 min on 2 busy cores
def test_every_operation_answers_as_documented(fuzz_server: ServerProcess, seed_alone: None) -> None:
    cases, fields, failures = fuzz(fuzz_server.url, GENERATION_EXAMPLES, OTHER_EXAMPLES)
    sent = sum(n for (path, _), n in cases.items() if path in GENERATION_ROUTES)
    assert sent >= GENERATION_CASES, dict(cases)
    doc = httpx.get(fuzz_server.url + "/openapi.json", timeout=10).json()
    for path, model in REQUEST_MODELS.items():
        declared = set(doc["components"]["schemas"][model]["properties"])
        assert declared <= fields[path], f"{path}: never sent {sorted(declared - fields[path])}"
    assert not failures, f"{len(failures)} distinct failures:\n\n" + "\n\n".join(
        f"{k}\n{v}" for k, v in list(failures.items())[:8])
