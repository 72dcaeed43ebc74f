"""Error answers: the one error body, the client-error exception, and pydantic's errors in the server's words.

Every 4xx and 5xx the server sends is ``{"error": {"message", "type", "param", "code"}}`` built by
``error_body``: the request contract's refusals (``RequestError``), the middleware's 401/404/405/413/415,
the engine's refusals (``RequestFailed``), and a failure mid-stream. A ``ValidationError`` from the
request models becomes one ``RequestError`` naming the field by its path and the bad value
(``temperature must be in [0, 2], got 3``, ``messages[0].content must be ...``).

``REFUSED`` is the one list of known fields the server cannot honour and why: the request models
declare them with the only value they accept and take their descriptions from here, and a request
that sets one gets a 400 saying why.

This module knows nothing about routes, models or the engine.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
          415: "unsupported_media_type", 429: "overloaded", 500: "internal_error", 503: "unavailable"}


def error_body(message: str, *, status: int = 400, type: str | None = None, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body; ``type`` and ``code`` default from the status."""
    kind = type or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or _CODES.get(status)}}


INTERNAL_ERROR = error_body("internal error during generation", status=500)


class RequestError(Exception):
    """A client error (or a refusal like 429/503), answered with ``error_body``."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value", status: int = 400,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, status=self.status, type=self.type, param=self.param, code=self.code)


def loads_json(data: bytes | bytearray) -> Any:
    """Strict JSON: ``NaN`` and ``Infinity`` (which Python's parser accepts) are refused."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(data, parse_constant=refuse)


# Known fields the server cannot honour, and why (a request setting one gets "<field>: <why>, got <value>").
# A name another route honours is qualified by the refusing route's endpoint ("responses.prompt").
REFUSED = {
    "audio": "audio output is not supported",
    "modalities": 'only the "text" modality is supported',
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this is not a reasoning model",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
    "moderation": "moderation is not supported",
    "store": "nothing is stored here (store must be false)",
    "service_tier": 'one service tier is served: "auto" or "default"',
    "prompt_cache_retention": "prompt cache retention is not supported",
    "prompt_cache_options": "prompt cache options are not supported",
    "parallel_tool_calls": "function calling is not supported",
    "functions": "function calling is not supported",
    "include_obfuscation": "stream obfuscation is not supported",
    "use_beam_search": "beam search is not supported",
    "length_penalty": "length_penalty applies to beam search, which is not supported",
    "allowed_token_ids": "allowed_token_ids is not supported; use logit_bias",
    "bad_words": "bad_words is not supported; use logit_bias",
    "prompt_logprobs": "prompt_logprobs is not supported in vLLM's shape; use echo with logprobs",
    "echo": "echo is only supported on /v1/completions",
    "suffix": "suffix (insertion) is not supported",
    "chat_template": "a request cannot bring its own chat template (a template is code the server runs)",
    # vLLM's other extensions
    "prompt_embeds": "prompt embeddings are not supported",
    "priority": "priority scheduling is not supported",
    "logits_processors": "custom logits processors are not supported",
    "return_tokens_as_token_ids": "logprobs name tokens by their text (chat adds their bytes), never as token ids",
    "return_token_ids": "token_ids are always returned; the prompt's come with echo",
    "cache_salt": "prefix-cache salting is not supported",
    "kv_transfer_params": "KV transfer (disaggregated serving) is not supported",
    "vllm_xargs": "extension arguments are not supported",
    "max_repetition_pattern_size": "repetition detection is not supported",
    "min_repetition_pattern_size": "repetition detection is not supported",
    "repetition_min_count": "repetition detection is not supported",
    "include_reasoning": "this is not a reasoning model",
    "documents": "documents are not supported by the chat template",
    "mm_processor_kwargs": "only text input is supported",
    "disable_additional_properties": "disable_additional_properties is not supported; set additionalProperties: "
                                     "false in the schema",
    "structural_tag": "structural tags are not supported",
    # the Responses API's
    "previous_response_id": "responses are not stored, so there is none to continue; send the conversation in input",
    "conversation": "responses are not stored, so there is no conversation to add to; send it in input",
    "background": "background responses are not supported (they need stored responses)",
    "background_options": "background responses are not supported",
    "reasoning": "this is not a reasoning model",
    "include": "there is nothing to include: no tools, reasoning or logprobs",
    "max_tool_calls": "tools are not supported",
    "responses.top_logprobs": "logprobs are not supported on /v1/responses",
    "truncation": "the input is never truncated (an input that does not fit is refused)",
    "responses.prompt": "stored prompt templates are not supported",
    "context_management": "context management (compaction) is not supported",
    "image": "only text input is supported",
    "access_programs": "access programs are not supported",
}


def refused(name: str, only: str = "null") -> str:
    """A refused field's description in the request models (the OpenAPI document states it)."""
    why = REFUSED[name]
    return f"Not supported: {why[0].upper()}{why[1:]} (only {only})."


# --- pydantic errors --> 400 bodies -------------------------------------------------------------
# A field whose every element is one setting: an error inside it names the field, like OpenAI's params.
_WHOLE = frozenset({"stop", "prompt", "stop_token_ids", "logit_bias", "guided_choice", "guided_json", "tokens",
                    "metadata", "modalities", "content", "tools", "schema"})
# Errors that mean "a value other than the only one accepted" (on a field in _UNSUPPORTED).
_REFUSALS = frozenset({"none_required", "literal_error", "greater_than_equal", "less_than_equal", "string_too_long"})


def _param(loc: tuple[Any, ...]) -> str:
    """``('messages', 0, 'role')`` -> ``messages[0].role``; an error inside a whole-valued field names the field."""
    out = ""
    for part in loc:
        if part == "[key]":
            break
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
            if part in _WHOLE:
                break
    return out


def _show(v: Any) -> str:
    try:
        s = json.dumps(v, ensure_ascii=False)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bounds(model: type[BaseModel], loc: tuple[Any, ...]) -> dict[str, Any]:
    """The numeric bounds (ge/gt/le/lt) declared where ``loc`` points, to name the whole interval in a message.

    Walks the field's annotation down the location: a list index into the item type, a map key into the
    value type, through Optional / unions and Annotated metadata.
    """
    info = model.model_fields.get(str(loc[0])) if loc else None
    if info is None:
        return {}
    found: dict[str, Any] = {}

    def collect(meta: Any) -> None:
        for m in meta:
            for k in ("ge", "gt", "le", "lt"):
                if getattr(m, k, None) is not None:
                    found.setdefault(k, getattr(m, k))
            collect(getattr(m, "metadata", ()) or ())

    def members(tp: Any) -> list[Any]:
        """tp without Annotated and Optional: the member types, collecting metadata on the way."""
        if typing.get_origin(tp) is typing.Annotated:
            collect(tp.__metadata__)
            return members(tp.__origin__)
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            return [m for a in typing.get_args(tp) if a is not type(None) for m in members(a)]
        return [tp]

    collect(info.metadata)
    current = members(info.annotation)
    for part in loc[1:]:
        nxt = []
        for tp in current:
            args = typing.get_args(tp)
            if isinstance(part, int) and typing.get_origin(tp) is list and args:
                nxt.append(args[0])
            elif isinstance(part, str) and typing.get_origin(tp) is dict and len(args) == 2:
                nxt.append(args[1])
        found.clear()
        current = [m for tp in nxt for m in members(tp)]
    return found


def _refusal(model: type[BaseModel], *names: str) -> str | None:
    """Why the first of ``names`` that ``model`` refuses is refused (REFUSED, its endpoint's own entry first)."""
    endpoint = getattr(model, "endpoint", "")
    for n in names:
        for key in (f"{endpoint}.{n}", n):
            if key in REFUSED:
                return REFUSED[key]
    return None


def _describe(err: dict[str, Any], name: str, model: type[BaseModel]) -> tuple[str, str]:
    """One pydantic error as (message, code), in the server's words."""
    t, v, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    field_name = str(err["loc"][-1]) if err["loc"] else name
    top = str(err["loc"][0]) if err["loc"] else name
    if t == "missing":
        return f"{name} is required", "missing_required_parameter"
    why = _refusal(model, field_name, top) if t in _REFUSALS else None
    if why is not None:
        return f"{name}: {why}, got {_show(v)}", "unsupported_parameter"
    kinds = {"int_type": "an integer", "float_type": "a number", "bool_type": "a boolean", "string_type": "a string",
             "list_type": "a list", "dict_type": "an object", "model_type": "an object",
             "model_attributes_type": "an object", "none_required": "null"}
    if t in kinds:
        return f"{name} must be {kinds[t]}, got {_show(v)}", "invalid_type"
    if t == "finite_number":
        return f"{name} must be a finite number, got {v}", "invalid_value"
    if t in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        b = {**_bounds(model, err["loc"]), **ctx}
        lo = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
        hi = ("]", b["le"]) if "le" in b else (")", b["lt"]) if "lt" in b else None
        if lo and hi:
            return f"{name} must be in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}, got {_show(v)}", "invalid_value"
        op, bound = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
                     "less_than": ("<", "lt")}[t]
        return f"{name} must be {op} {_num(b[bound])}, got {_show(v)}", "invalid_value"
    if t == "literal_error":
        return f"{name} must be {ctx.get('expected')}, got {_show(v)}", "invalid_value"
    if t == "too_long":
        return f"{name} may hold at most {ctx.get('max_length')} items, got {ctx.get('actual_length')}", "invalid_value"
    if t == "too_short":
        n = ctx.get("min_length")
        return (f"{name} must not be empty" if n == 1 else f"{name} must hold at least {n} items"), "invalid_value"
    if t == "string_too_short":
        n = ctx.get("min_length")
        return (f"{name} must not be empty" if n == 1 else f"{name} must be at least {n} characters"), "invalid_value"
    if t == "string_too_long":
        return f"{name} may be at most {ctx.get('max_length')} characters long", "invalid_value"
    if t == "string_pattern_mismatch":
        if "[key]" in err["loc"]:
            return f"{name} keys must be token ids (decimal digits), got {_show(v)}", "invalid_value"
        return f"{name} must match {ctx.get('pattern')}, got {_show(v)}", "invalid_value"
    if t == "string_unicode":
        return f"{name} is not valid Unicode (a lone surrogate?)", "invalid_value"
    if t == "extra_forbidden":
        return f"{name} is not a known field here", "invalid_value"
    if t == "union_type":
        return f"{name} {ctx.get('message')}", "invalid_type"
    return f"{name}: {err.get('msg')}", "invalid_value"


def broken_rule(message: str, param: str | None, code: str = "invalid_value") -> PydanticCustomError:
    """A cross-field rule a request model's validator enforces, raised inside it (answered as it says)."""
    return PydanticCustomError("request_rule", "{message}", {"message": message, "param": param, "code": code})


def request_error(exc: ValidationError, model: type[BaseModel]) -> RequestError:
    err = exc.errors(include_url=False)[0]
    if err["type"] == "request_rule":
        ctx = err["ctx"]
        return RequestError(ctx["message"], param=ctx["param"], code=ctx["code"])
    inner = (err.get("ctx") or {}).get("inner") if err["type"] == "union_member" else None
    if inner is not None:  # a union member's own error, relative to the union field
        err = dict(inner, loc=tuple(err["loc"]) + tuple(inner["loc"]))
    name = _param(tuple(err["loc"])) or "body"
    message, code = _describe(err, name, model)
    return RequestError(message, param=name if err["loc"] else None, code=code)


def _lone_surrogate(v: Any, path: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    """The path of the first string holding a lone surrogate (valid JSON, invalid Unicode), or None."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(v, dict):
        for k, x in v.items():
            found = _lone_surrogate(k, (*path, "[key]")) or _lone_surrogate(x, (*path, k))
            if found is not None:
                return found
    elif isinstance(v, list):
        for i, x in enumerate(v):
            found = _lone_surrogate(x, (*path, i))
            if found is not None:
                return found
    return None


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], body: Any) -> M:
    """The decoded JSON body as ``model``, or a RequestError naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", code="invalid_type")
    known = {k: v for k, v in body.items() if k in model.model_fields}  # unknown fields are ignored
    bad = _lone_surrogate(known)
    if bad is not None:
        name = _param(bad)
        raise RequestError(f"{name} is not valid Unicode (a lone surrogate?)", param=name)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise request_error(e, model) from None
