"""What the real server sends validates against the response models it is built from.

The builder makes bodies and chunks with ``model_construct`` (no validation on the hot path), so a
field of the wrong type or one the model does not declare would go out unchecked; here every kind of
answer is read back through its model (strict, closed: an extra or a missing field fails).
"""

from __future__ import annotations

import httpx
import pytest

from nextoken.serve.http import responses as R
from tests.conftest import ServerProcess

MESSAGES = [{"role": "user", "content": "the cat"}]
COMPLETIONS = [
    {"prompt": "the", "max_tokens": 4},
    {"prompt": "the", "max_tokens": 3, "logprobs": 3, "echo": True, "n": 2, "seed": 1},
    {"prompt": ["the", "a cat"], "max_tokens": 2, "logprobs": 0},
    {"prompt": [5, 6, 7], "max_tokens": 0, "echo": True, "logprobs": 2},
    {"prompt": "the", "max_tokens": 0, "echo": True},
]
CHATS = [
    {"messages": MESSAGES, "max_tokens": 4},
    {"messages": MESSAGES, "max_tokens": 3, "logprobs": True, "top_logprobs": 2, "service_tier": "auto"},
]


def events(r: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]


ROUTES = {"completions": ("/v1/completions", R.CompletionResponse, R.CompletionChunk),
          "chat": ("/v1/chat/completions", R.ChatCompletionResponse, R.ChatCompletionChunk)}


@pytest.mark.parametrize(("route", "body"), [("completions", b) for b in COMPLETIONS] + [("chat", b) for b in CHATS])
def test_generation_answers_validate(server: ServerProcess, route: str, body: dict) -> None:
    path, whole, chunk = ROUTES[route]
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    whole.model_validate_json(r.text)
    with httpx.stream("POST", server.url + path, timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
        chunks = events(s)
    assert chunks[-1] == "[DONE]" and len(chunks) >= 3  # a choice's chunks, the usage chunk, [DONE]
    for c in chunks[:-1]:
        chunk.model_validate_json(c)


def test_every_other_route_validates(server: ServerProcess) -> None:
    for path, model in (("/v1/models", R.ModelList), ("/health", R.HealthResponse), ("/ready", R.HealthResponse),
                        ("/tokenizer_info", R.TokenizerInfoResponse)):
        r = httpx.get(server.url + path, timeout=10)
        assert r.status_code == 200
        model.model_validate_json(r.text)
    for path, body, model in (("/tokenize", {"prompt": "the cat", "return_token_strs": True}, R.TokenizeResponse),
                              ("/tokenize", {"messages": MESSAGES}, R.TokenizeResponse),
                              ("/detokenize", {"tokens": [5, 6]}, R.DetokenizeResponse)):
        r = httpx.post(server.url + path, json=body, timeout=10)
        assert r.status_code == 200, r.text
        model.model_validate_json(r.text)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "temperature": 9}, timeout=10)
    assert r.status_code == 400
    R.ErrorResponse.model_validate_json(r.text)
