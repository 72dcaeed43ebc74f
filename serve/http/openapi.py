"""``/openapi.json`` generated from the request and response models (``requests.py``, ``responses.py``).

FastAPI documents a route's body only when the handler declares it as a typed parameter, and then
it validates the body itself (lax types, 422s, no NaN check); our handlers read the raw body and
validate with the models, so the document is assembled here instead: FastAPI's own document for
every route, then, for each route of ours, the request body and every response it can give (status,
media type, model), and the limits of the model version serving now (context length, vocabulary,
capacity) written into the fields they bound. It is rebuilt on every request, so a hot reload to a
model with another context is reflected at once.

LitServe's internal routes (``/``, ``/litserve/health``, ``/litserve/info``) are not part of this API
and are left out of the document.

The document is read in a browser at ``/docs``, a static page of ours (``serve/http/static/docs.html``).
FastAPI's own ``/docs`` (Swagger UI) and ``/redoc`` fetch their scripts from a CDN: blank offline
and outside the pages' Content-Security-Policy, so ``install_openapi`` removes them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from nextoken import __version__
from nextoken.serve.http import requests as Q
from nextoken.serve.http import responses as R
from nextoken.serve.http import responses_api as A

LITSERVE_INTERNAL = frozenset({"/", "/litserve/health", "/litserve/info"})
_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Limits:
    """What bounds a request on this server now."""

    context: int  # tokens: prompt + max_tokens
    vocab_size: int  # token ids are below it
    capacity: int  # engine requests running or queued at once (prompts x n)
    max_body_bytes: int  # the largest request body (--max-body-bytes)


@dataclass(frozen=True)
class Operation:
    path: str
    method: str
    summary: str
    request: list[type[BaseModel]] | None  # one model, or several a body may be (anyOf)
    responses: dict[str, tuple[str, type[BaseModel] | None, str]]  # status -> (description, model, media type)
    stream_of: type[BaseModel] | None = None  # 200 may also be text/event-stream of these chunks
    typed_events: bool = False  # the stream's events are named by their type and end without [DONE]


_ERR = R.ErrorResponse
_JSON = "application/json"
_COMMON_ERRORS = {
    "400": ("Invalid request: `error.param` names the field, `error.message` says why.", _ERR, _JSON),
    "401": ("Missing or wrong API key (when the server has one).", _ERR, _JSON),
}
_BODY_ERRORS = {
    **_COMMON_ERRORS,
    "404": ("The `model` named is not served here.", _ERR, _JSON),
    "413": ("The body is larger than the server's --max-body-bytes.", _ERR, _JSON),
    "415": ("The body is not `application/json`.", _ERR, _JSON),
}
_GENERATION = {
    **_BODY_ERRORS,
    "429": ("At capacity: retry after `Retry-After` seconds. Never queued.", _ERR, _JSON),
    "500": ("Generation failed inside the server.", _ERR, _JSON),
    "503": ("Draining (shutting down) or the engine stopped.", _ERR, _JSON),
}

OPERATIONS = [
    Operation("/v1/completions", "post", "Complete prompts (OpenAI's completions, with vLLM's extensions)",
              [Q.CompletionRequest],
              {"200": ("The completion, or with `stream: true` server-sent events.", R.CompletionResponse, _JSON),
               **_GENERATION}, stream_of=R.CompletionChunk),
    Operation("/v1/chat/completions", "post", "Chat (OpenAI's chat completions, with vLLM's extensions)",
              [Q.ChatCompletionRequest],
              {"200": ("The completion, or with `stream: true` server-sent events.", R.ChatCompletionResponse,
                       _JSON), **_GENERATION}, stream_of=R.ChatCompletionChunk),
    Operation("/v1/responses", "post", "Respond to text input (OpenAI's Responses API, text only; nothing is stored)",
              [A.ResponsesRequest],
              {"200": ("The response, or with `stream: true` its typed server-sent events.", R.ResponseObject, _JSON),
               **_GENERATION}, stream_of=R.ResponseStreamEvent, typed_events=True),
    Operation("/v1/models", "get", "The model served", None,
              {"200": ("The model version taking new requests.", R.ModelList, _JSON),
               "401": _COMMON_ERRORS["401"]}),
    Operation("/tokenize", "post", "Tokenize a prompt or chat messages (vLLM's shape)",
              [Q.TokenizeCompletionRequest, Q.TokenizeChatRequest],
              {"200": ("The tokens the generation routes would feed.", R.TokenizeResponse, _JSON),
               **_BODY_ERRORS}),
    Operation("/apply-template", "post", "Render chat messages with the model's chat template (llama.cpp's)",
              [Q.ApplyTemplateRequest],
              {"200": ("The prompt text /v1/chat/completions would feed.", R.ApplyTemplateResponse, _JSON),
               **_BODY_ERRORS}),
    Operation("/detokenize", "post", "Token ids to text (vLLM's shape)", [Q.DetokenizeRequest],
              {"200": ("The text.", R.DetokenizeResponse, _JSON), **_BODY_ERRORS}),
    Operation("/tokenizer_info", "get", "The tokenizer's configuration (vLLM's; lm-eval's remote tokenizer)", None,
              {"200": ("tokenizer_config.json's fields, the chat template and the vocabulary size.",
                       R.TokenizerInfoResponse, _JSON), "401": _COMMON_ERRORS["401"]}),
    Operation("/health", "get", "Liveness and readiness (no API key needed)", None,
              {"200": ("Serving.", R.HealthResponse, _JSON),
               "503": ("Loading, draining or failed.", R.HealthResponse, _JSON)}),
    Operation("/ready", "get", "Readiness: a model is loaded and the server is not draining", None,
              {"200": ("Ready for requests.", R.HealthResponse, _JSON),
               "401": _COMMON_ERRORS["401"],
               "503": ("Loading, draining or failed.", R.HealthResponse, _JSON)}),
    Operation("/metrics", "get", "Prometheus metrics", None,
              {"200": ("Prometheus text exposition format.", None, "text/plain"),
               "401": _COMMON_ERRORS["401"]}),
    Operation("/admin/reload", "post", "Look for a new model version now", None,
              {"202": ("Requested; the worker loads and checks it beside the running version.",
                       R.ReloadResponse, _JSON), "401": _COMMON_ERRORS["401"]}),
]


def _models() -> list[tuple[type[BaseModel], str]]:
    seen: list[tuple[type[BaseModel], str]] = []
    for op in OPERATIONS:
        for m in op.request or []:
            seen.append((m, "validation"))
        for _, model, _ in op.responses.values():
            if model is not None:
                seen.append((model, "serialization"))
        if op.stream_of is not None:
            seen.append((op.stream_of, "serialization"))
    return list(dict.fromkeys(seen))


def _components() -> tuple[dict[tuple[type[BaseModel], str], dict[str, Any]], dict[str, Any]]:
    refs, defs = models_json_schema(_models(), ref_template=_REF)
    return refs, defs.get("$defs", {})


def _bound(node: dict[str, Any], key: str, value: int) -> None:
    """Tighten ``key`` (maximum / maxItems) in a property schema and in each anyOf member that has the key."""
    targets = [node] + [m for m in node.get("anyOf", []) if isinstance(m, dict)]
    for t in targets:
        if t.get("type") in ("integer", "array") and key in ("maximum", "maxItems") and (
                (key == "maximum" and t.get("type") == "integer") or (key == "maxItems" and t.get("type") == "array")):
            t[key] = min(t.get(key, value), value)


def _token_items(node: dict[str, Any], vocab: int) -> None:
    """Every integer token id inside a property schema (nested arrays too) is below the vocabulary size."""
    if not isinstance(node, dict):
        return
    if node.get("type") == "integer" and node.get("minimum") == 0:
        node["maximum"] = vocab - 1
    for key in ("anyOf", "items"):
        sub = node.get(key)
        for s in sub if isinstance(sub, list) else [sub] if isinstance(sub, dict) else []:
            _token_items(s, vocab)


def _apply_limits(defs: dict[str, Any], limits: Limits) -> None:
    most = limits.context - 1  # a fed prompt has at least one token
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = defs[name]["properties"]
        for field in ("max_tokens", "max_completion_tokens", "min_tokens", "truncate_prompt_tokens"):
            if field in props:
                _bound(props[field], "maximum", most)
        _bound(props["n"], "maximum", limits.capacity)
        _token_items(props["stop_token_ids"], limits.vocab_size)
        props["n"]["description"] += f" Here: prompts x n <= {limits.capacity}."
        props["max_tokens"]["description"] += f" Context here: {limits.context} tokens."
    prompt = defs["CompletionRequest"]["properties"]["prompt"]
    _token_items(prompt, limits.vocab_size)
    for member in prompt["anyOf"]:
        if member.get("type") == "array" and member.get("items", {}).get("type") != "integer":
            member["maxItems"] = min(member.get("maxItems", limits.capacity), limits.capacity)
    _token_items(defs["DetokenizeRequest"]["properties"]["tokens"], limits.vocab_size)
    out = defs["ResponsesRequest"]["properties"]["max_output_tokens"]
    _bound(out, "maximum", most)
    out["description"] += f" Context here: {limits.context} tokens."


def _stream_schema(chunk: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1 describes an event stream by its events): ``data`` is a chunk as JSON,
    an error body if generation fails mid-stream, or ``[DONE]`` once after every choice finished."""
    data = {"type": "string", "anyOf": [
        {"const": "[DONE]"},
        {"contentMediaType": "application/json", "contentSchema": {"anyOf": [chunk, error]}},
    ]}
    return {"schema": {"type": "object", "properties": {"event": {"const": "message"}, "data": data},
                       "required": ["event", "data"], "additionalProperties": False,
                       "description": "A `data:` line: one chunk per step and choice (each names its choice index), "
                                      "then `data: [DONE]`."}}


def _typed_stream_schema(event: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The Responses API's stream: each event is named by its type (``event: response.created``) and ``data`` is
    the event as JSON; the last is response.completed, response.incomplete or error (no ``[DONE]``)."""
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": event}
    return {"schema": {"type": "object", "properties": {"event": {"enum": names}, "data": data},
                       "required": ["event", "data"], "additionalProperties": False,
                       "description": "One typed event per `event:` / `data:` pair, in the order the event model "
                                      "lists."}}


def _event_names(model: type[BaseModel]) -> list[str]:
    """Every ``type`` a stream-event union's members may have."""
    names: list[str] = []
    for member in model.model_json_schema(mode="serialization").get("$defs", {}).values():
        if "sequence_number" not in member.get("properties", {}):
            continue  # a part of an event (the message, its text), not an event
        t = member.get("properties", {}).get("type", {})
        names += t.get("enum", []) or ([t["const"]] if "const" in t else [])
    return sorted(set(names))


def openapi_document(app: FastAPI, limits: Limits) -> dict[str, Any]:
    for route in app.routes:  # LitServe's own routes are not this API
        if getattr(route, "path", None) in LITSERVE_INTERNAL:
            route.include_in_schema = False
    doc = get_openapi(title="nextoken", version=__version__, routes=app.routes,
                      description="OpenAI-compatible serving of a nextoken model, with vLLM's tokenizer routes and "
                                  "sampling extensions. Every constraint here is the one the server enforces.")
    refs, defs = _components()
    defs = copy.deepcopy(defs)
    _apply_limits(defs, limits)
    doc.setdefault("components", {}).setdefault("schemas", {}).update(defs)
    for op in OPERATIONS:
        entry = doc.setdefault("paths", {}).setdefault(op.path, {}).setdefault(op.method, {})
        entry["summary"] = op.summary
        entry.pop("requestBody", None)
        if op.request:
            bodies = [refs[(m, "validation")] for m in op.request]
            body_schema = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
            entry["requestBody"] = {"required": True, "content": {_JSON: {"schema": body_schema}}}
        responses: dict[str, Any] = {}
        for status, (desc, model, media) in op.responses.items():
            content: dict[str, Any] = {media: {"schema": refs[(model, "serialization")]} if model is not None
                                       else {"schema": {"type": "string"}}}
            if status == "200" and op.stream_of is not None and op.typed_events:
                content["text/event-stream"] = _typed_stream_schema(refs[(op.stream_of, "serialization")],
                                                                    _event_names(op.stream_of))
            elif status == "200" and op.stream_of is not None:
                content["text/event-stream"] = _stream_schema(refs[(op.stream_of, "serialization")],
                                                              refs[(_ERR, "serialization")])
            if status == "413":
                desc = f"The body is larger than {limits.max_body_bytes:,} bytes (--max-body-bytes)."
            responses[status] = {"description": desc, "content": content}
            if status == "429":
                responses[status]["headers"] = {"Retry-After": {"description": "Seconds to wait.",
                                                                "schema": {"type": "string"}}}
        entry["responses"] = responses
    return doc


def remove_cdn_pages(app: FastAPI) -> None:
    """Drop FastAPI's Swagger UI, its OAuth2 redirect and ReDoc: they load from a CDN (see the module note).

    LitServe builds the FastAPI app with their default paths and offers no option to leave them out,
    and FastAPI mounts them as the app is made, so the routes are taken out afterwards.
    """
    gone = {app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url} - {None}
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in gone]
    app.docs_url = app.redoc_url = app.swagger_ui_oauth2_redirect_url = None


def install_openapi(app: FastAPI, limits: Callable[[], Limits]) -> None:
    """Serve ``openapi_document`` at /openapi.json, rebuilt for the version serving now (the page /docs
    draws it), and remove the CDN pages."""
    app.openapi = lambda: openapi_document(app, limits())  # type: ignore[method-assign]
    remove_cdn_pages(app)
