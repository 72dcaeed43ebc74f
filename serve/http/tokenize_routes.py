"""vLLM's tokenizer routes: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

Shapes as vLLM's ``serving_tokenization`` (request: ``prompt`` or ``messages``, ``add_special_tokens``,
``return_token_strs``; response: ``tokens``, ``count``, ``max_model_len``, ``token_strs``; detokenize:
``tokens`` -> ``prompt``). lm-evaluation-harness's remote tokenizer (``tokenizer_backend=remote``, which
``local-completions`` picks on its own when both routes answer) reads ``eos_token``/``bos_token`` and
``chat_template`` from ``/tokenizer_info`` and encodes with ``/tokenize`` (``add_special_tokens: false``),
so it counts tokens exactly as the server feeds them.

The tokens returned are the ones /v1/completions and /v1/chat/completions would feed for the same text:
a text prompt with the special tokens its tokenizer adds (a nextoken model's ``<|endoftext|>``),
messages through the same chat template. llama.cpp's ``POST /apply-template`` returns the rendered chat
text itself. The routes answer from the HTTP process's tokenizer of the version serving now; nothing
here touches the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel

from nextoken.serve.http import responses as R
from nextoken.serve.http.bodies import read_json
from nextoken.serve.http.builder import answer
from nextoken.serve.http.errors import RequestError, validate
from nextoken.serve.http.plan import TokenizerView, render_chat
from nextoken.serve.http.requests import (
    ApplyTemplateRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)


class TokenizerModel(TokenizerView, Protocol):
    """What the routes need from the served model (``served_model.ServedModel``)."""

    id: str
    name: str

    def token_text(self, token_id: int) -> str: ...

    def tokenizer_config(self) -> dict[str, Any]: ...


def check_model(requested: str | None, model: TokenizerModel) -> None:
    if requested is not None and requested not in (model.id, model.name):
        raise RequestError(f"model {requested!r} is not served here; this server serves {model.id!r}", param="model",
                           status=404, code="model_not_found")


def tokenize(body: Any, model: TokenizerModel) -> R.TokenizeResponse:
    """vLLM's TokenizeCompletionRequest (``prompt``) or TokenizeChatRequest (``messages``) -> TokenizeResponse."""
    if isinstance(body, dict) and "messages" in body:
        r = validate(TokenizeChatRequest, body)
        check_model(r.model, model)
        ids = model.encode_prompt(render_chat(model.chat, r), bool(r.add_special_tokens))
    else:
        r = validate(TokenizeCompletionRequest, body)
        check_model(r.model, model)
        ids = model.encode_prompt(r.prompt, r.add_special_tokens is not False)
    strs = {"token_strs": [model.token_text(t) for t in ids]} if r.return_token_strs else {}
    return R.TokenizeResponse.model_construct(count=len(ids), max_model_len=model.context, tokens=ids, **strs)


def apply_template(body: Any, model: TokenizerModel) -> R.ApplyTemplateResponse:
    """llama.cpp's ``POST /apply-template``: ``messages`` -> ``{"prompt": the rendered chat}``."""
    r = validate(ApplyTemplateRequest, body)
    check_model(r.model, model)
    return R.ApplyTemplateResponse.model_construct(prompt=render_chat(model.chat, r))


def detokenize(body: Any, model: TokenizerModel) -> R.DetokenizeResponse:
    r = validate(DetokenizeRequest, body)
    check_model(r.model, model)
    vocab = model.vocab_size
    bad = [t for t in r.tokens if t >= vocab]
    if bad:
        raise RequestError(f"tokens must be in [0, {vocab}), got {bad[0]}", param="tokens")
    return R.DetokenizeResponse.model_construct(prompt=model.decode(list(r.tokens)))


def tokenizer_info(model: TokenizerModel) -> dict[str, Any]:
    """The tokenizer_config.json a Hugging Face tokenizer would load, with what the server itself does."""
    specials = model.chat.special_tokens
    info: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": None}
    info.update({k: v for k, v in model.tokenizer_config().items() if k != "added_tokens_decoder"})
    # What the server does wins over the file: these are how /tokenize and the generation routes behave.
    info.update({k: v for k, v in specials.items() if v is not None})
    info.update(model_max_length=model.context, vocab_size=model.vocab_size, chat_template=model.chat.source,
                add_bos_token=bool(model.encode_prompt("", True)))
    return info


def mount_tokenizer_routes(app: FastAPI, get_model: Callable[[], TokenizerModel],
                           answer_error: Callable[[RequestError], Response], max_body_bytes: int) -> None:
    """Add the three routes; ``answer_error`` turns a RequestError into the response (and counts it)."""

    def route(convert: Callable[[Any, TokenizerModel], BaseModel]) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Response:
            try:
                return answer(convert(await read_json(request, max_body_bytes), get_model()))
            except RequestError as e:
                return answer_error(e)

        return handle

    app.add_api_route("/tokenize", route(tokenize), methods=["POST"])
    app.add_api_route("/detokenize", route(detokenize), methods=["POST"])
    app.add_api_route("/apply-template", route(apply_template), methods=["POST"])

    @app.get("/tokenizer_info")
    async def tokenizer_info_route(request: Request) -> Response:
        return answer(R.TokenizerInfoResponse.model_construct(**tokenizer_info(get_model())))
