"""vLLM's current request surface, shown to have its effect through the real server: continuous usage stats,
``structured_outputs`` (and its ``guided_*`` old names), the detokenizer's options, ``include_stop_str_in_output``,
``truncate_prompt_tokens``, ``request_id``, the chat template's ends, and ``usage.prompt_tokens_details.cached_tokens``
and ``cache_write_tokens`` (agreeing with the prefix cache's metrics). test_params.py points each of these fields here.

Two servers: the char-level model with a 512-token context, and the byte-level BPE model (32-token context),
whose vocabulary has the characters JSON needs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, metric

openai = pytest.importorskip("openai")

EOS = 0  # <|endoftext|> is the first token of every vocabulary nextoken trains


@pytest.fixture(scope="module")
def server(serve_artifact: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(serve_artifact, "--max-batch-size", "8", "--max-queue", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def bpe_server(tiny_bpe_artifact: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(tiny_bpe_artifact, "--max-batch-size", "4", "--max-queue", "4")
    yield s
    s.stop()


def post(s: ServerProcess, body: dict, path: str = "/v1/completions") -> dict:
    r = httpx.post(s.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream(s: ServerProcess, body: dict, path: str = "/v1/completions") -> list[dict]:
    with httpx.stream("POST", s.url + path, json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        data = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def tokenize(s: ServerProcess, text: str, **kw: object) -> list[int]:
    return post(s, {"prompt": text, **kw}, "/tokenize")["tokens"]


def model_id(s: ServerProcess) -> str:
    return httpx.get(s.url + "/v1/models", timeout=10).json()["data"][0]["id"]


# --- streaming usage --------------------------------------------------------------------------
def test_continuous_usage_stats_put_usage_in_every_chunk(server: ServerProcess) -> None:
    """Each chunk's usage is its own choice's so far (vLLM's shape); the last chunk, the whole request's."""
    body = {"prompt": ["the cat", "a dog"], "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 4,
            "ignore_eos": True}
    whole = post(server, body)
    chunks = stream(server, {**body, "stream_options": {"continuous_usage_stats": True}})
    *steps, last = chunks
    assert last["choices"] == [] and last["usage"] == whole["usage"]  # include_usage defaults to true with it
    prompts = [len(tokenize(server, p)) for p in body["prompt"]]
    made: dict[int, int] = {}
    for ch in steps:
        (choice,) = ch["choices"]
        i = choice["index"]
        made[i] = made.get(i, 0) + len(choice["token_ids"])
        u = ch["usage"]
        assert u["prompt_tokens"] == prompts[i // 2] and u["completion_tokens"] == made[i], (ch, made)
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert made == {0: 6, 1: 6, 2: 6, 3: 6}
    # guidellm's request, through the openai client: usage in every chunk, the last one has it all
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    got = list(c.chat.completions.create(
        model=model_id(server), messages=[{"role": "user", "content": "hi"}], max_completion_tokens=5, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},  # type: ignore[typeddict-unknown-key]
        extra_body={"ignore_eos": True, "stop": None}))
    assert all(ch.usage is not None for ch in got)
    assert [ch.usage.completion_tokens for ch in got if ch.choices and ch.choices[0].delta.content][-1] == 5
    assert got[-1].choices == [] and got[-1].usage.completion_tokens == 5
    plain = stream(server, {**body, "stream_options": {"include_usage": True}})
    assert all("usage" not in ch for ch in plain[:-1])  # without it, only the last chunk has usage


# --- structured output ---------------------------------------------------------------------------
def test_structured_outputs_and_their_old_names(server: ServerProcess, bpe_server: ServerProcess) -> None:
    base = {"prompt": "the", "max_tokens": 10}
    cases = (({"regex": "[ab]{3}"}, {"guided_regex": "[ab]{3}"}, lambda t: re.fullmatch("[ab]{3}", t)),
             ({"choice": ["yes", "no"]}, {"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
             ({"grammar": 'start: "cat" | "dog"'}, {"guided_grammar": 'start: "cat" | "dog"'},
              lambda t: t in ("cat", "dog")))
    for seed in range(3):
        for so, old, ok in cases:
            new = post(server, {**base, "seed": seed, "structured_outputs": so})["choices"][0]["text"]
            assert ok(new), (so, new)
            # the old name is the same request: the same seed gives the same text
            assert post(server, {**base, "seed": seed, **old})["choices"][0]["text"] == new
    schema = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"], "additionalProperties": False}
    for seed in range(3):
        r = post(bpe_server, {"prompt": "the", "max_tokens": 24, "seed": seed,
                              "structured_outputs": {"json": json.dumps(schema), "whitespace_pattern": " ?"}})
        assert json.loads(r["choices"][0]["text"]) in ({"a": 1}, {"a": 2})
        tight = post(bpe_server, {"prompt": "the", "max_tokens": 24, "seed": seed,
                                  "structured_outputs": {"json": schema, "disable_any_whitespace": True}})
        text = tight["choices"][0]["text"]
        assert json.loads(text) in ({"a": 1}, {"a": 2}) and not re.search(r"\s", text), text
        obj = post(bpe_server, {"prompt": "the", "max_tokens": 20, "seed": seed,
                                "structured_outputs": {"json_object": True, "disable_any_whitespace": True}})
        text = obj["choices"][0]["text"]
        assert text.startswith("{") and not text[1:2].isspace(), text  # (a key's text may hold spaces)
        if obj["choices"][0]["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
    # through the openai client, on chat
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = c.chat.completions.create(model=model_id(server), messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no")
    both = httpx.post(server.url + "/v1/completions", json={**base, "guided_choice": ["a"],
                                                             "structured_outputs": {"choice": ["a"]}}, timeout=10)
    assert both.status_code == 400 and both.json()["error"]["param"] == "guided_choice"


# --- the detokenizer's options and stop strings --------------------------------------------------
def test_skip_special_tokens_and_the_spaces_between_them(server: ServerProcess) -> None:
    body = {"prompt": "the", "max_tokens": 3, "temperature": 0, "ignore_eos": True, "logit_bias": {str(EOS): 100}}
    skipped = post(server, body)["choices"][0]
    assert skipped["token_ids"] == [EOS] * 3 and skipped["text"] == ""  # the default: special tokens add no text
    shown = post(server, {**body, "skip_special_tokens": False})["choices"][0]
    assert shown["text"] == "<|endoftext|> <|endoftext|> <|endoftext|>"
    tight = post(server, {**body, "skip_special_tokens": False, "spaces_between_special_tokens": False})
    assert tight["choices"][0]["text"] == "<|endoftext|>" * 3
    streamed = stream(server, {**body, "skip_special_tokens": False})
    assert "".join(ch["choices"][0]["text"] for ch in streamed) == shown["text"]
    chat = post(server, {"messages": [{"role": "user", "content": "hi"}], **{k: v for k, v in body.items()
                                                                            if k != "prompt"},
                         "skip_special_tokens": False}, "/v1/chat/completions")
    assert chat["choices"][0]["message"]["content"] == shown["text"]


def test_include_stop_str_in_output_keeps_the_stop_string(server: ServerProcess) -> None:
    base = {"prompt": "the cat", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    full = post(server, base)["choices"][0]["text"]
    stop = full[6:9]
    cut = full.index(stop)
    plain = post(server, {**base, "stop": [stop]})["choices"][0]
    kept = post(server, {**base, "stop": [stop], "include_stop_str_in_output": True})["choices"][0]
    assert plain["text"] == full[:cut] and kept["text"] == full[:cut + len(stop)]
    assert kept["finish_reason"] == plain["finish_reason"] == "stop"
    streamed = stream(server, {**base, "stop": [stop], "include_stop_str_in_output": True})
    assert "".join(ch["choices"][0]["text"] for ch in streamed) == kept["text"]


# --- the prompt ---------------------------------------------------------------------------------
def test_truncate_prompt_tokens_feeds_the_last_tokens(server: ServerProcess) -> None:
    ids = tokenize(server, "the cat sat on the mat")  # <|endoftext|> first
    base = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    cut = post(server, {**base, "prompt": "the cat sat on the mat", "truncate_prompt_tokens": 5})
    assert cut["usage"]["prompt_tokens"] == 5
    assert cut["choices"][0]["token_ids"] == post(server, {**base, "prompt": ids[-5:]})["choices"][0]["token_ids"]
    long = "the cat sat on the mat. " * 30  # 720 characters: more than the 512-token context
    err = httpx.post(server.url + "/v1/completions", json={**base, "prompt": long}, timeout=10)
    assert err.status_code == 400 and err.json()["error"]["code"] == "context_length_exceeded"
    fit = post(server, {**base, "prompt": long, "truncate_prompt_tokens": -1})  # as many as fit beside max_tokens
    assert fit["usage"]["prompt_tokens"] == 512 - 8 and fit["usage"]["completion_tokens"] == 8
    chat = post(server, {**base, "messages": [{"role": "user", "content": "hello there"}], "truncate_prompt_tokens": 6},
                "/v1/chat/completions")
    assert chat["usage"]["prompt_tokens"] == 6


def test_add_generation_prompt_and_continue_final_message(server: ServerProcess) -> None:
    base = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "he"}]
    chat = post(server, {**base, "messages": msgs, "continue_final_message": True,
                         "add_generation_prompt": False}, "/v1/chat/completions")
    same = post(server, {**base, "prompt": "User: hi\nAssistant: he", "stop": ["\nUser:"]})
    assert chat["choices"][0]["message"]["content"] == same["choices"][0]["text"]
    bare = post(server, {**base, "messages": msgs[:1], "add_generation_prompt": False}, "/v1/chat/completions")
    same = post(server, {**base, "prompt": "User: hi\n", "stop": ["\nUser:"]})
    assert bare["choices"][0]["message"]["content"] == same["choices"][0]["text"]
    assert bare["usage"]["prompt_tokens"] == len(tokenize(server, "User: hi\n"))


def test_request_id_names_the_response(server: ServerProcess) -> None:
    assert post(server, {"prompt": "the", "max_tokens": 2, "request_id": "job-7"})["id"] == "cmpl-job-7"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "request_id": "job-8"}
    assert post(server, chat, "/v1/chat/completions")["id"] == "chatcmpl-job-8"
    assert {ch["id"] for ch in stream(server, chat, "/v1/chat/completions")} == {"chatcmpl-job-8"}


# --- cached tokens -------------------------------------------------------------------------------
def test_cached_tokens_in_usage_agree_with_the_prefix_cache_metrics(server: ServerProcess) -> None:
    """A prompt sent again is served from the prefix cache: usage says how many tokens, in every answer's shape,
    and the server's nextoken_prefix_cache_hits_total / queries_total grow by exactly the tokens usage reports."""
    mid = model_id(server)

    def counters() -> tuple[float, float]:
        return (metric(server.url, "nextoken_prefix_cache_hits_total", model=mid),
                metric(server.url, "nextoken_prefix_cache_queries_total", model=mid))

    prompt = "how are you? i love next token prediction. the quick brown fox jumps over the lazy dog"  # unique here
    n = len(tokenize(server, prompt))
    hits0, queries0 = counters()
    first = post(server, {"prompt": prompt, "max_tokens": 2})["usage"]
    again = post(server, {"prompt": prompt, "max_tokens": 2})["usage"]
    streamed = stream(server, {"prompt": prompt, "max_tokens": 2, "stream_options": {"include_usage": True}})
    last = streamed[-1]["usage"]
    # whole 16-token blocks: written when the prompt is done, served again (never the last token) after
    assert first["prompt_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": n // 16 * 16}
    assert again["prompt_tokens_details"] == {"cached_tokens": (n - 1) // 16 * 16, "cache_write_tokens": 0}
    assert last["prompt_tokens_details"] == again["prompt_tokens_details"]
    msgs = [{"role": "user", "content": prompt}]
    chat = [post(server, {"messages": msgs, "max_tokens": 2}, "/v1/chat/completions")["usage"] for _ in range(2)]
    assert chat[1]["prompt_tokens_details"]["cached_tokens"] > 0
    resp = post(server, {"input": prompt, "max_output_tokens": 2}, "/v1/responses")["usage"]
    assert resp["input_tokens_details"] == chat[1]["prompt_tokens_details"]  # the same prompt, the same blocks
    hits1, queries1 = counters()
    usages = [first, again, last, *chat]
    assert hits1 - hits0 == sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages) \
        + resp["input_tokens_details"]["cached_tokens"]
    assert queries1 - queries0 == sum(u["prompt_tokens"] for u in usages) + resp["input_tokens"]


# --- speculative decoding ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec_server(serve_artifact: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(serve_artifact, "--speculative", "ngram", "--prompt-lookup-min", "1", "--max-batch-size", "4",
                      "--max-queue", "4")
    yield s
    s.stop()


def test_speculative_false_keeps_a_request_from_drafting(server: ServerProcess, spec_server: ServerProcess,
                                                         serve_artifact: Path) -> None:
    """On a server with --speculative ngram, a repetitive greedy request gives the text the server without it
    gives, and drafts: the nextoken_spec_decode_* counters grow by exactly what an engine core with the
    server's options counts for that request in-process (acceptance by position summing to the accepted
    tokens), and its accepted_draft marks that many tokens. With speculative: false the same request gives
    the same text, no accepted_draft and no counter moves."""
    from nextoken.export.artifact import load_artifact
    from nextoken.serve.config import ServeConfig
    from nextoken.serve.engine.core import EngineCore
    from nextoken.serve.engine.loop import engine_options
    from nextoken.serve.wire import AddRequest, SamplingParams

    mid = model_id(spec_server)
    names = ("drafts", "draft_tokens", "accepted_tokens")

    def counts() -> list[float]:
        per_pos = [metric(spec_server.url, "nextoken_spec_decode_num_accepted_tokens_per_pos_total", model=mid,
                          position=str(p)) for p in range(4)]
        return [metric(spec_server.url, f"nextoken_spec_decode_num_{n}_total", model=mid) for n in names] + per_pos

    body = {"prompt": "hello hello hello hello", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    plain = post(server, body)["choices"][0]
    before = counts()
    opted_out = post(spec_server, {**body, "speculative": False})["choices"][0]
    assert opted_out["text"] == plain["text"] and "accepted_draft" not in opted_out and "accepted_draft" not in plain
    assert counts() == before
    drafted = post(spec_server, body)["choices"][0]
    assert drafted["text"] == plain["text"]
    grown = [b - a for a, b in zip(before, counts(), strict=True)]
    # accepted_draft marks each accepted draft token of the answer (the first token never is one)
    assert len(drafted["accepted_draft"]) == len(drafted["token_ids"]) and not drafted["accepted_draft"][0]
    assert sum(drafted["accepted_draft"]) == grown[2]
    config = ServeConfig(artifact_dir=str(serve_artifact), speculative="ngram", prompt_lookup_min=1, max_batch_size=4)
    core = EngineCore(load_artifact(serve_artifact), engine_options(config.validate()))
    ids = tokenize(spec_server, body["prompt"])
    core.add(AddRequest("r", ids, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), 0.0, core.model_id))
    while core.has_work():
        core.step()
    t = core.spec.totals
    assert grown == [t.drafts, t.draft_tokens, t.accepted, *t.per_pos] and t.accepted > 0
    assert sum(grown[3:]) == grown[2]
    # a stop string, logprobs and a stream: the same answer from both servers, drafts accepted meanwhile
    body = {"prompt": "hello hello hello hello", "max_tokens": 60, "temperature": 0, "logprobs": 2, "stop": ["t t t t"]}
    a, b = post(server, body)["choices"][0], post(spec_server, body)["choices"][0]
    assert (a["text"], a["finish_reason"], a["logprobs"]["tokens"]) == (b["text"], b["finish_reason"],
                                                                      b["logprobs"]["tokens"])
    assert b["finish_reason"] == "stop" and counts()[2] > before[2] + grown[2]
    assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=2e-5)
    text = "".join(c["choices"][0]["text"] for c in stream(spec_server, body) if c.get("choices"))
    assert text == a["text"]
