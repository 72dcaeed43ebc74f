"""A model's own chat template, its generation_config.json and its end tokens, through the real server.

The char model (512-token context) is served with ``--chat-template`` (a template in the words its
vocabulary has), and republished with an edited generation_config.json: sampling defaults, and a list of
end-of-text ids as Llama-3 instruct models ship.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, republish
from tests.serve.http.test_openai_compat import greedy, post, tokenize

# Upper-case role names and "." are in the char model's vocabulary; `thinking` comes from chat_template_kwargs.
TEMPLATE = ("{% if messages | length > 4 %}{{ raise_exception('at most four messages, please') }}{% endif %}"
            "{% for m in messages %}{{ m.role | upper }}. {{ m.content }}\n{% endfor %}"
            "{% if thinking is defined %}thinking {{ thinking }}.\n{% endif %}"
            "{% if add_generation_prompt %}ASSISTANT. {% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def chat_server(serve_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE, encoding="utf-8")
    s = ServerProcess(serve_artifact, "--chat-template", str(template), "--max-batch-size", "4")
    yield s
    s.stop()


def card(s: ServerProcess) -> dict:
    return httpx.get(s.url + "/v1/models", timeout=10).json()["data"][0]


def chat(s: ServerProcess, **body: object) -> dict:
    return post(s, {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, **body}, "/v1/chat/completions")


def test_chat_renders_the_models_template(chat_server: ServerProcess) -> None:
    text = "SYSTEM. be brief\nUSER. hello there\nASSISTANT. "
    assert card(chat_server)["chat_template"] == "--chat-template"
    assert post(chat_server, {"messages": MESSAGES}, "/apply-template") == {"prompt": text}
    # the rendered chat is fed as it is: nothing added (the template writes any special tokens itself)
    ids = tokenize(chat_server, text, add_special_tokens=False)
    assert post(chat_server, {"messages": MESSAGES}, "/tokenize")["tokens"] == ids
    r = chat(chat_server)
    assert r["usage"]["prompt_tokens"] == len(ids)
    plain = post(chat_server, {"prompt": text, "max_tokens": 12, "temperature": 0, "add_special_tokens": False})
    assert r["choices"][0]["message"]["content"] == plain["choices"][0]["text"]  # no "\nUser:" stop of our own
    info = httpx.get(chat_server.url + "/tokenizer_info", timeout=10).json()
    assert info["chat_template"] == TEMPLATE


def test_continue_final_message_and_chat_template_kwargs(chat_server: ServerProcess) -> None:
    prefix = [*MESSAGES, {"role": "assistant", "content": "the cat"}]
    cont = post(chat_server, {"messages": prefix, "continue_final_message": True, "add_generation_prompt": False},
                "/apply-template")["prompt"]
    assert cont == "SYSTEM. be brief\nUSER. hello there\nASSISTANT. the cat"
    r = chat(chat_server, messages=prefix, continue_final_message=True, add_generation_prompt=False)
    assert r["usage"]["prompt_tokens"] == len(tokenize(chat_server, cont, add_special_tokens=False))
    kw = post(chat_server, {"messages": MESSAGES, "chat_template_kwargs": {"thinking": "no"}}, "/apply-template")
    assert kw["prompt"] == "SYSTEM. be brief\nUSER. hello there\nthinking no.\nASSISTANT. "
    bare = post(chat_server, {"messages": MESSAGES, "add_generation_prompt": False}, "/apply-template")["prompt"]
    assert bare == "SYSTEM. be brief\nUSER. hello there\n"


def test_a_template_that_refuses_the_chat_is_a_400_naming_messages(chat_server: ServerProcess) -> None:
    five = [{"role": "user", "content": "hi"}] * 5
    for path in ("/v1/chat/completions", "/tokenize", "/apply-template"):
        r = httpx.post(chat_server.url + path, json={"messages": five, "max_tokens": 2}, timeout=10)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and "at most four messages, please" in err["message"]


@pytest.mark.parametrize(("value", "message"), [("missing.jinja", "cannot read it"),
                                                ("{% if %}", "does not compile")])
def test_a_bad_chat_template_flag_is_refused_naming_it(serve_artifact: Path, tmp_path: Path, value: str,
                                                       message: str) -> None:
    value = str(tmp_path / value) if value.endswith(".jinja") else value
    r = subprocess.run([sys.executable, "-m", "nextoken", "serve", str(serve_artifact), "--chat-template", value,
                        "--port", "65500"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--chat-template" in r.stderr and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# --- generation_config.json ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def recommended(serve_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model republished with its creator's recommended settings: greedy, 5 new tokens."""
    return republish(serve_artifact, tmp_path_factory.mktemp("gc") / "art",
                     json_edits={"generation_config.json": {"temperature": 0.0, "max_new_tokens": 5, "top_k": 7}})


def test_generation_config_sets_what_a_request_omits(recommended: Path) -> None:
    s = ServerProcess(recommended, "--max-batch-size", "4")
    try:
        assert card(s)["default_sampling_params"] == {"temperature": 0.0, "top_p": 1.0, "top_k": 7, "max_tokens": 5}
        body = {"prompt": "the cat", "ignore_eos": True}
        outs = {post(s, {**body, "seed": seed})["choices"][0]["text"] for seed in range(4)}
        assert outs == {greedy(s, "the cat", n=5)["text"]}  # greedy by default, 5 tokens
        r = post(s, {**body, "seed": 1, "temperature": 1.5, "top_k": 0, "max_tokens": 40})  # the request's own win
        assert r["usage"]["completion_tokens"] == 40 and r["choices"][0]["text"] != greedy(s, "the cat", n=40)["text"]
    finally:
        s.stop()
    off = ServerProcess(recommended, "--generation-config", "vllm", "--max-batch-size", "4")
    try:
        assert card(off)["default_sampling_params"] == {}
        assert post(off, {"prompt": "the cat", "ignore_eos": True})["usage"]["completion_tokens"] == 16  # OpenAI's
    finally:
        off.stop()


def test_every_end_of_text_id_ends_generation(serve_artifact: Path, tmp_path: Path) -> None:
    """A list of end ids (Llama-3 instruct: <|end_of_text|> and <|eot_id|>): each ends the output, unseen."""
    probe = ServerProcess(serve_artifact, "--max-batch-size", "2")
    try:
        text = post(probe, {"prompt": "the cat", "max_tokens": 24, "temperature": 0})["choices"][0]["text"]
    finally:
        probe.stop()
    k = max(i for i in range(len(text)) if text[i] not in text[:i])  # the last character first produced at step k
    end_char = text[k]
    art = republish(serve_artifact, tmp_path / "art", json_edits={"generation_config.json": {"eos_token_id": [
        0, _char_id(serve_artifact, end_char)]}})
    s = ServerProcess(art, "--max-batch-size", "2")
    try:
        r = post(s, {"prompt": "the cat", "max_tokens": 24, "temperature": 0})["choices"][0]
        assert (r["text"], r["finish_reason"]) == (text[:k], "stop")
        held = post(s, {"prompt": "the cat", "max_tokens": 24, "temperature": 0, "min_tokens": k + 2})
        assert held["usage"]["completion_tokens"] >= k + 2  # min_tokens holds back every end id
    finally:
        s.stop()


def _char_id(artifact: Path, ch: str) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(artifact / "tokenizer.json")).token_to_id(ch)
