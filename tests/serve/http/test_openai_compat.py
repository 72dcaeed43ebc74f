"""Each parameter the server honours, shown to have its effect through the real server (the openai client where
it can be): test_params.py points every honoured parameter at one of these tests.

Two servers: the char-level model with a 512-token context (most tests), and the byte-level BPE model
(32-token context), whose vocabulary has the characters JSON needs, for structured output.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import jinja2
import pytest

from tests.conftest import ServerProcess

openai = pytest.importorskip("openai")

EOS = 0  # <|endoftext|> is the first token of every vocabulary nextoken trains


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


def post(s: ServerProcess, body: dict, path: str = "/v1/completions") -> dict:
    r = httpx.post(s.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def tokenize(s: ServerProcess, text: str, **kw: object) -> list[int]:
    return post(s, {"prompt": text, **kw}, "/tokenize")["tokens"]


def greedy(s: ServerProcess, prompt: str | list, n: int = 20, **kw: object) -> dict:
    return post(s, {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, **kw})["choices"][0]


# --- model, prompt, messages, max_tokens --------------------------------------------------------
def test_model_names_the_served_version(server: ServerProcess) -> None:
    c = client(server)
    mid = model_id(server)
    assert c.completions.create(model=mid, prompt="the", max_tokens=2).model == mid
    assert c.completions.create(model=mid.split(":")[0], prompt="the", max_tokens=2).model == mid  # the name
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-9", prompt="the", max_tokens=2)
    assert e.value.body["param"] == "model"


def test_batched_prompts_are_indexed_as_openai_does(server: ServerProcess) -> None:
    c = client(server)
    prompts = ["the cat", "a dog", "hello"]
    alone = [greedy(server, p, 8)["text"] for p in prompts]
    r = c.completions.create(model=model_id(server), prompt=prompts, n=2, max_tokens=8, temperature=0,
                             extra_body={"ignore_eos": True})
    assert [ch.index for ch in r.choices] == list(range(6))
    assert [ch.text for ch in r.choices] == [t for t in alone for _ in range(2)]  # index = prompt x n + j
    ids = [tokenize(server, p) for p in prompts]  # with the <|endoftext|> a text prompt starts after
    r2 = c.completions.create(model=model_id(server), prompt=ids, max_tokens=8, temperature=0,
                              extra_body={"ignore_eos": True})
    assert [ch.text for ch in r2.choices] == alone
    # usage: each prompt once, every choice's tokens
    assert r.usage.prompt_tokens == sum(len(i) for i in ids) and r.usage.completion_tokens == 6 * 8


def test_chat_is_the_template_through_completions(server: ServerProcess) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    chat = client(server).chat.completions.create(model=model_id(server), messages=msgs, max_tokens=12,
                                                  temperature=0)
    info = httpx.get(server.url + "/tokenizer_info", timeout=10).json()
    text = jinja2.Environment().from_string(info["chat_template"]).render(messages=msgs, add_generation_prompt=True)
    assert text == "System: be brief\nUser: hello there\nAssistant:"
    plain = post(server, {"prompt": text, "max_tokens": 12, "temperature": 0, "stop": ["\nUser:"]})["choices"][0]
    assert chat.choices[0].message.content == plain["text"]
    assert post(server, {"messages": msgs}, "/tokenize")["tokens"] == tokenize(server, text)


def test_max_tokens_is_the_length(server: ServerProcess) -> None:
    c = client(server)
    r = c.completions.create(model=model_id(server), prompt="the", max_tokens=7, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    msgs = [{"role": "user", "content": "hi"}]
    chat = c.chat.completions.create(model=model_id(server), messages=msgs, max_tokens=9, max_completion_tokens=4,
                                     extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 4  # max_completion_tokens wins
    chat = c.chat.completions.create(model=model_id(server), messages=msgs, max_tokens=6,
                                     extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 6


# --- sampling ---------------------------------------------------------------------------------
def test_temperature_zero_is_the_argmax(server: ServerProcess) -> None:
    c = client(server)
    r = c.completions.create(model=model_id(server), prompt="the", max_tokens=15, temperature=0, logprobs=1,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert all(abs(max(t.values()) - x) < 1e-6 for t, x in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    hot = c.completions.create(model=model_id(server), prompt="the", max_tokens=40, temperature=2, seed=3,
                               extra_body={"ignore_eos": True})
    assert hot.choices[0].text != greedy(server, "the", 40)["text"]


def test_top_p_top_k_min_p_narrow_to_the_argmax(server: ServerProcess) -> None:
    """At temperature 1.5 every filter that keeps only the most likely token gives the greedy text."""
    base = {"prompt": "the", "max_tokens": 40, "temperature": 1.5, "seed": 5, "ignore_eos": True}
    want = greedy(server, "the", 40)["token_ids"]
    assert post(server, base)["choices"][0]["token_ids"] != want  # the filters, not luck, make the difference
    for extra in ({"top_k": 1}, {"top_p": 1e-9}, {"min_p": 1.0}):
        assert post(server, {**base, **extra})["choices"][0]["token_ids"] == want, extra


def test_penalties_change_a_repetitive_greedy_output(server: ServerProcess) -> None:
    plain = greedy(server, "the", 60)["token_ids"]
    top_count = Counter(plain).most_common(1)[0][1]
    assert top_count > 6  # the tiny model repeats itself: something for the penalties to act on
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 3.0}):
        ids = greedy(server, "the", 60, **extra)["token_ids"]
        assert ids != plain, extra
        assert Counter(ids).most_common(1)[0][1] < top_count, extra


def test_seed_reproduces_and_n_choices_differ(server: ServerProcess) -> None:
    c = client(server)
    kw = {"model": model_id(server), "prompt": "the", "max_tokens": 30, "temperature": 1.0, "seed": 11,
          "extra_body": {"ignore_eos": True}}
    three = [ch.text for ch in c.completions.create(n=3, **kw).choices]
    assert len(set(three)) == 3  # each choice sampled on its own
    assert [ch.text for ch in c.completions.create(n=3, **kw).choices] == three  # seeded: reproducible
    assert c.completions.create(n=1, **kw).choices[0].text == three[0]  # choice 0 keeps the request's seed
    assert [ch.text for ch in c.completions.create(n=3, best_of=3, **kw).choices] == three
    chat = c.chat.completions.create(model=kw["model"], messages=[{"role": "user", "content": "hi"}], n=2,
                                     max_tokens=20, seed=4, extra_body={"ignore_eos": True})
    assert [ch.index for ch in chat.choices] == [0, 1]
    assert chat.choices[0].message.content != chat.choices[1].message.content


def test_logit_bias_forces_and_bans_tokens(server: ServerProcess) -> None:
    c = client(server)
    mid = model_id(server)
    forced = tokenize(server, "z", add_special_tokens=False)[0]
    r = c.completions.create(model=mid, prompt="the", max_tokens=10, temperature=0, logit_bias={str(forced): 100},
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == "z" * 10
    plain = greedy(server, "the", 20)
    banned = plain["token_ids"][0]
    r = c.completions.create(model=mid, prompt="the", max_tokens=20, temperature=0, logit_bias={str(banned): -100},
                             extra_body={"ignore_eos": True})
    ids = tokenize(server, r.choices[0].text, add_special_tokens=False)
    assert banned not in ids and ids != plain["token_ids"]
    chat = c.chat.completions.create(model=mid, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                     temperature=0, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == "z" * 5


def test_min_tokens_holds_back_end_of_text(server: ServerProcess) -> None:
    body = {"prompt": "the", "max_tokens": 20, "temperature": 0, "logit_bias": {str(EOS): 100}}
    early = post(server, body)["choices"][0]
    assert early["finish_reason"] == "stop" and early["token_ids"] in ([], [EOS])  # ends at once
    held = post(server, {**body, "min_tokens": 6})["choices"][0]
    assert held["finish_reason"] == "stop"
    assert len([t for t in held["token_ids"] if t != EOS]) >= 6


def test_ignore_eos_generates_past_end_of_text(server: ServerProcess) -> None:
    body = {"prompt": "the", "max_tokens": 12, "temperature": 0, "logit_bias": {str(EOS): 100}}
    assert post(server, body)["choices"][0]["finish_reason"] == "stop"
    r = post(server, {**body, "ignore_eos": True})
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 12


def test_stop_strings_through_the_openai_client(server: ServerProcess) -> None:
    full = greedy(server, "the cat", 40)["text"]
    stop = full[6:9]
    r = client(server).completions.create(model=model_id(server), prompt="the cat", max_tokens=40, temperature=0,
                                          stop=[stop, "@@"], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[: full.index(stop)]


def test_stop_token_ids_end_the_output(server: ServerProcess) -> None:
    """The output ends at the first stop token, which is generated and returned with its text (vLLM's behaviour
    for an ordinary token; include_stop_str_in_output only concerns stop strings)."""
    plain = greedy(server, "the cat", 30)
    ids = plain["token_ids"]
    first = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # a token new at position >= 1
    r = greedy(server, "the cat", 30, stop_token_ids=[ids[first]])
    assert r["finish_reason"] == "stop"
    assert r["token_ids"] == ids[: first + 1]
    assert r["text"] == plain["text"][: first + 1]  # char model: one character per token


def test_add_special_tokens_false_feeds_the_text_alone(server: ServerProcess) -> None:
    with_eos = post(server, {"prompt": "the cat", "max_tokens": 1})["usage"]["prompt_tokens"]
    alone = post(server, {"prompt": "the cat", "max_tokens": 1, "add_special_tokens": False})
    assert alone["usage"]["prompt_tokens"] == with_eos - 1 == len(tokenize(server, "the cat", add_special_tokens=False))


# --- logprobs and echo -------------------------------------------------------------------------
def test_logprobs_give_the_top_alternatives(server: ServerProcess) -> None:
    c = client(server)
    r = c.completions.create(model=model_id(server), prompt="the", max_tokens=6, temperature=0, logprobs=3,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 6 and all(len(t) == 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset == list(range(6))
    chat = c.chat.completions.create(model=model_id(server), messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=4, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert [len(t.top_logprobs) for t in chat.choices[0].logprobs.content] == [2] * 4
    bare = c.chat.completions.create(model=model_id(server), messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=4, logprobs=True, extra_body={"ignore_eos": True})
    assert [t.top_logprobs for t in bare.choices[0].logprobs.content] == [[]] * 4


def test_echo_prepends_the_prompt_and_scores_it(server: ServerProcess) -> None:
    """Echo with logprobs scores the prompt exactly as generation scored the same tokens (lm-eval's loglikelihood)."""
    c = client(server)
    mid = model_id(server)
    only = c.completions.create(model=mid, prompt="the cat", max_tokens=0, echo=True)
    assert only.choices[0].text == "the cat" and only.usage.completion_tokens == 0
    more = c.completions.create(model=mid, prompt="the cat", max_tokens=3, echo=True, temperature=0,
                                extra_body={"ignore_eos": True})
    assert more.choices[0].text == "the cat" + greedy(server, "the cat", 3)["text"]

    gen = greedy(server, "the cat", 10, logprobs=2)
    ids = tokenize(server, "the cat") + gen["token_ids"]  # <|endoftext|>, the prompt, what was generated
    scored = c.completions.create(model=mid, prompt=ids, max_tokens=0, echo=True, logprobs=2).choices[0]
    lp = scored.logprobs
    assert scored.text == "<|endoftext|>the cat" + gen["text"] and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing before the first token
    tail = slice(len(ids) - 10, None)
    assert lp.tokens[tail] == gen["logprobs"]["tokens"]
    assert lp.token_logprobs[tail] == pytest.approx(gen["logprobs"]["token_logprobs"], abs=1e-4)
    for got, want in zip(lp.top_logprobs[tail], gen["logprobs"]["top_logprobs"], strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    # A text prompt starts after <|endoftext|>: its first token has a logprob, the same as in the id prompt.
    text = c.completions.create(model=mid, prompt="the cat", max_tokens=0, echo=True, logprobs=1).choices[0]
    assert text.logprobs.tokens == list("the cat")
    assert text.logprobs.token_logprobs == pytest.approx(lp.token_logprobs[1:8], abs=1e-4)
    # lm-eval's request: a batch of token-id prompts, max_tokens 1, one choice per prompt, prompt tokens first
    batch = post(server, {"prompt": [ids[:5], ids[:9]], "max_tokens": 1, "temperature": 0, "logprobs": 1,
                          "echo": True})
    assert [len(ch["logprobs"]["token_logprobs"]) for ch in batch["choices"]] == [6, 10]
    assert batch["choices"][1]["logprobs"]["token_logprobs"][1:9] == pytest.approx(lp.token_logprobs[1:9], abs=1e-4)


# --- streaming ---------------------------------------------------------------------------------
def test_streamed_choices_carry_their_index_and_usage_sums_them(server: ServerProcess) -> None:
    body = {"prompt": ["the cat", "a dog"], "n": 2, "max_tokens": 12, "temperature": 1.0, "seed": 9,
            "ignore_eos": True}
    whole = post(server, body)
    texts: dict[int, str] = {}
    finished: Counter = Counter()
    lines = []
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        lines = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines.count("[DONE]") == 1 and lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    for ch in chunks[:-1]:
        (choice,) = ch["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        finished[choice["index"]] += choice["finish_reason"] is not None
    assert texts == {ch["index"]: ch["text"] for ch in whole["choices"]}  # seeded: the same four choices
    assert finished == {0: 1, 1: 1, 2: 1, 3: 1}
    # the openai client reads the same stream
    streamed: dict[int, str] = {}
    for ch in client(server).completions.create(model=model_id(server), stream=True,
                                                **{k: v for k, v in body.items() if k != "ignore_eos"},
                                                extra_body={"ignore_eos": True}):
        for choice in ch.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == texts


def test_service_tier_is_reported(server: ServerProcess) -> None:
    c = client(server)
    r = c.chat.completions.create(model=model_id(server), messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                  service_tier="auto")
    assert r.service_tier == "default"
    assert c.chat.completions.create(model=model_id(server), messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=2).service_tier is None


def test_metadata_is_recorded_in_the_request_log(server: ServerProcess) -> None:
    c = client(server)
    c.chat.completions.create(model=model_id(server), messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                              user="alice", metadata={"team": "eval"}, safety_identifier="u-17",
                              prompt_cache_key="k-3")
    c.completions.create(model=model_id(server), prompt="the", max_tokens=2, user="bob",
                         extra_body={"ignore_eos": True})
    records = [json.loads(line.split(" nextoken.serve.requests ", 1)[1]) for line in server.output().splitlines()
               if " nextoken.serve.requests " in line]
    # outcome: the finish reason, as nextoken_requests_total's outcome label names it
    assert any(r.get("user") == "alice" and r.get("metadata") == {"team": "eval"} and r.get("safety_identifier")
               == "u-17" and r.get("prompt_cache_key") == "k-3" and r["outcome"] in ("stop", "length")
               for r in records)
    assert any(r.get("user") == "bob" and r["endpoint"] == "completions" and r["outcome"] == "length" for r in records)


# --- structured output -----------------------------------------------------------------------
def test_response_format_json_schema_is_enforced(bpe_server: ServerProcess) -> None:
    """The 32-token context leaves 14 tokens after the chat template: a one-key schema and at most one space per gap."""
    c = client(bpe_server)
    schema = {"type": "object", "properties": {"a": {"enum": ["y", "n"]}}, "required": ["a"],
              "additionalProperties": False}
    for seed in range(3):
        r = c.chat.completions.create(model=model_id(bpe_server), messages=[{"role": "user", "content": "a"}],
                                      max_tokens=14, seed=seed, response_format={
                                          "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
                                      extra_body={"guided_whitespace_pattern": " ?"})
        assert json.loads(r.choices[0].message.content) in ({"a": "y"}, {"a": "n"})
    r = c.completions.create(model=model_id(bpe_server), prompt="the", max_tokens=30, seed=1,
                             extra_body={"response_format": {"type": "json_object"}, "guided_whitespace_pattern": " ?"})
    text = r.choices[0].text
    assert text.startswith("{")
    if r.choices[0].finish_reason == "stop":  # it closed within the tiny context: one object
        assert isinstance(json.loads(text), dict)


def test_guided_regex_choice_and_json(server: ServerProcess, bpe_server: ServerProcess) -> None:
    for seed in range(3):
        r = post(server, {"prompt": "the", "max_tokens": 10, "seed": seed, "guided_regex": "[ab]{3}"})["choices"][0]
        assert re.fullmatch("[ab]{3}", r["text"]), r
        r = post(server, {"prompt": "the", "max_tokens": 10, "seed": seed, "guided_choice": ["yes", "no"]})
        assert r["choices"][0]["text"] in ("yes", "no")
        r = post(server, {"prompt": "the", "max_tokens": 10, "seed": seed,
                          "guided_grammar": 'start: "cat" | "dog"'})
        assert r["choices"][0]["text"] in ("cat", "dog")
        r = post(bpe_server, {"prompt": "the", "max_tokens": 24, "seed": seed, "guided_whitespace_pattern": " ?",
                              "guided_json": {"type": "object", "properties": {"a": {"enum": [1, 2]}},
                                              "required": ["a"], "additionalProperties": False}})
        assert json.loads(r["choices"][0]["text"]) in ({"a": 1}, {"a": 2})


# --- vLLM's tokenizer routes and lm-eval's remote tokenizer ---------------------------------------
def test_tokenize_detokenize_and_tokenizer_info_in_vllm_shapes(server: ServerProcess) -> None:
    r = post(server, {"prompt": "the cat", "return_token_strs": True}, "/tokenize")
    assert r["count"] == len(r["tokens"]) == 8 and r["max_model_len"] == 512
    assert r["tokens"][0] == EOS and r["token_strs"] == ["<|endoftext|>", *"the cat"]
    bare = post(server, {"prompt": "the cat", "add_special_tokens": False}, "/tokenize")
    assert bare["tokens"] == r["tokens"][1:] and "token_strs" not in bare
    assert post(server, {"tokens": bare["tokens"]}, "/detokenize") == {"prompt": "the cat"}
    # the tokens a completion reports are the ones /tokenize gives
    assert post(server, {"prompt": "the cat", "max_tokens": 1})["usage"]["prompt_tokens"] == r["count"]
    msgs = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "he"}]}
    cont = post(server, {**msgs, "continue_final_message": True, "add_generation_prompt": False}, "/tokenize")
    assert cont["tokens"] == tokenize(server, "User: hi\nAssistant: he")  # ends inside the last message
    info = httpx.get(server.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 512 and info["vocab_size"] == 59
    for bad, param in (({"tokens": [10 ** 6]}, "tokens"), ({"prompt": 5}, "prompt"), ({"model": "x", "prompt": "a"},
                                                                                      "model")):
        path = "/detokenize" if "tokens" in bad else "/tokenize"
        err = httpx.post(server.url + path, json=bad, timeout=10)
        assert err.status_code in (400, 404) and err.json()["error"]["param"] == param


def test_lm_eval_remote_tokenizer_uses_the_servers_tokenizer(server: ServerProcess) -> None:
    """What lm-eval's local-completions checks and calls (lm_eval.utils.check_remote_tokenizer_support)."""
    info = httpx.get(server.url + "/tokenizer_info", timeout=10).json()
    assert "eos_token" in info
    eos = post(server, {"prompt": info["eos_token"], "add_special_tokens": False}, "/tokenize")["tokens"]
    assert eos == [EOS]  # RemoteTokenizer.eos_token_id = encode(eos_token)[0]
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    base = server.url + "/v1/completions"
    assert lm_eval_utils.check_remote_tokenizer_support(base)
    tok = lm_eval_utils.RemoteTokenizer(base)
    assert tok.eos_token_id == EOS and tok.decode(tok.encode("the cat")) == "the cat"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "User: hi\nAssistant:"
