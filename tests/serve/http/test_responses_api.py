"""POST /v1/responses through the official openai client: ``client.responses.create`` and ``.stream``.

A response is the chat route's answer in the Responses API's shapes: the same messages (instructions
first) give the same text and the same token counts, so these tests compare the two routes on the same
server. Bodies are checked against the openai package's own ``Response`` model; streams must be the
typed event sequence the client's stream helper accumulates. test_params.py points the route's
honoured fields here and checks its refusals.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess

openai = pytest.importorskip("openai")
from openai.types.responses import Response  # noqa: E402

EVENTS = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
ENDS = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def server(serve_artifact: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(serve_artifact, "--max-batch-size", "8", "--max-queue", "8", "--log-level", "info")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def bpe_server(tiny_bpe_artifact: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(tiny_bpe_artifact, "--max-batch-size", "4", "--max-queue", "4")
    yield s
    s.stop()


def client(s: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)


def model_id(s: ServerProcess) -> str:
    return httpx.get(s.url + "/v1/models", timeout=10).json()["data"][0]["id"]


def test_responses_create_answers_as_chat_does(server: ServerProcess) -> None:
    c, mid = client(server), model_id(server)
    r = c.responses.create(model=mid, input="hello there", instructions="be brief", max_output_tokens=12,
                           temperature=0, metadata={"team": "eval"}, user="alice", safety_identifier="u-1",
                           prompt_cache_key="k-1", service_tier="auto", tools=[], tool_choice="none")
    chat = c.chat.completions.create(model=mid, max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}])
    assert r.output_text == chat.choices[0].message.content
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.id.startswith("resp_") and r.model == mid and r.instructions == "be brief"
    assert r.metadata == {"team": "eval"} and r.service_tier == "default" and r.tools == []
    raw = httpx.post(server.url + "/v1/responses", json={"input": "hi", "max_output_tokens": 3}, timeout=60).json()
    Response.model_validate(raw)  # every field the openai package's own model requires, in its types
    # a conversation as messages, with an earlier output sent back as it came
    convo = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
             {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
              "content": [{"type": "output_text", "text": "hello", "annotations": []}]},
             {"role": "user", "content": "and you"}]
    r = c.responses.create(model=mid, input=convo, max_output_tokens=10, temperature=0)
    chat = c.chat.completions.create(model=mid, max_tokens=10, temperature=0, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and you"}])
    assert r.output_text == chat.choices[0].message.content
    # sampling settings act as on chat: the same seed, temperature and top_p give the same text
    for kw in ({"temperature": 1.0}, {"temperature": 1.2, "top_p": 0.5}):
        r = c.responses.create(model=mid, input="hi", max_output_tokens=20, extra_body={"seed": 3, "ignore_eos": True},
                               **kw)
        chat = c.chat.completions.create(model=mid, messages=[{"role": "user", "content": "hi"}], max_tokens=20,
                                         seed=3, extra_body={"ignore_eos": True}, **kw)
        assert r.output_text == chat.choices[0].message.content, kw
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.create(model="gpt-9", input="hi")
    assert e.value.body["param"] == "model"
    records = [json.loads(line.split(" nextoken.serve.requests ", 1)[1]) for line in server.output().splitlines()
               if " nextoken.serve.requests " in line]
    assert any(x["endpoint"] == "responses" and x.get("user") == "alice" and x.get("metadata") == {"team": "eval"}
               and x.get("safety_identifier") == "u-1" and x.get("prompt_cache_key") == "k-1" for x in records)


def test_max_output_tokens_makes_the_response_incomplete(server: ServerProcess) -> None:
    c, mid = client(server), model_id(server)
    r = c.responses.create(model=mid, input="hi", max_output_tokens=5, extra_body={"ignore_eos": True})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5 and r.output[0].status == "incomplete"
    events = list(c.responses.create(model=mid, input="hi", max_output_tokens=5, stream=True,
                                     extra_body={"ignore_eos": True}))
    assert events[-1].type == "response.incomplete" and events[-1].response.usage.output_tokens == 5


def test_responses_stream_through_the_openai_client(server: ServerProcess) -> None:
    c, mid = client(server), model_id(server)
    full = c.responses.create(model=mid, input="the cat", max_output_tokens=40, temperature=0,
                              extra_body={"ignore_eos": True}).output_text
    stop = full[6:9]
    want = full[: full.index(stop)]
    kw = {"model": mid, "input": "the cat", "max_output_tokens": 40, "temperature": 0,
          "extra_body": {"ignore_eos": True, "stop": [stop]}}
    done = c.responses.create(**kw)
    assert done.status == "completed" and done.output_text == want  # the stop string ended it
    with c.responses.stream(**kw) as s:
        events = list(s)
        final = s.get_final_response()
    types = [e.type for e in events]
    n = types.count("response.output_text.delta")
    assert types == EVENTS + ["response.output_text.delta"] * n + ENDS + ["response.completed"], types
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want
    assert events[-len(ENDS) - 1].text == want  # response.output_text.done
    assert final.output_text == want and final.status == "completed" and final.usage.output_tokens == \
        done.usage.output_tokens
    streamed = list(c.responses.create(stream=True, stream_options={"include_obfuscation": False}, **kw))
    assert streamed[-1].type == "response.completed" and streamed[-1].response.output_text == want


def test_text_format_json_schema_is_enforced(bpe_server: ServerProcess) -> None:
    c, mid = client(bpe_server), model_id(bpe_server)
    schema = {"type": "string", "enum": ["yes", "no"]}  # a JSON string: no whitespace for a tiny model to waste
    for seed in range(3):
        r = c.responses.create(model=mid, input="a", max_output_tokens=12, extra_body={"seed": seed},
                               text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
        assert r.status == "completed" and json.loads(r.output_text) in ("yes", "no")
        assert r.text.format.type == "json_schema"
    r = c.responses.create(model=mid, input="a", max_output_tokens=14, text={"format": {"type": "json_object"}})
    assert r.output_text.lstrip().startswith("{")
    if r.status == "completed":  # it closed within the tiny context: one object
        assert isinstance(json.loads(r.output_text), dict)
