"""OpenAI-compatible requests and responses: validate, plan one engine request per choice, assemble answers.

Convert: request JSON --> ``GenerationRequest`` (``parse_request``: the pydantic models of
``schema.py``, errors as 400 bodies naming ``param``) --> one ``Choice`` per prompt and ``n``
(``plan_choices``: tokenize, check the context and the vocabulary, derive seeds) --> the engine
(``prompt_ids`` exactly as fed + ``SamplingParams``) --> events per choice --> ``ResponseBuilder``
(one body, or one chunk per event, choice index = prompt index x n + j, as OpenAI numbers them).

Validation happens once, at the boundary, and every error names the field and the bad value
(``temperature must be in [0, 2], got 3``), so clients get a 400 with an OpenAI-style body instead
of a 500 from deep inside. Unknown fields are ignored, as vLLM does; known fields with the wrong
type or range, and known fields the server cannot honour, are refused.

Prompts: a text prompt is fed after ``<|endoftext|>`` (documents start there in training) unless
``add_special_tokens`` is false; a token-id prompt is fed exactly as given (lm-eval's windows count
on it). ``echo`` returns the prompt's own tokens, not that implicit first token; with ``logprobs``
each echoed token has its log-probability given everything before it, so only a token with nothing
before it (the first of a token-id prompt) has ``null``, as OpenAI's first token does.

Chat template (documented in the README; ``CHAT_TEMPLATE`` is the same as Jinja for clients that
render it, like lm-eval): every message becomes ``"{Role}: {content}\\n"`` (System, User,
Assistant; developer is System) and the prompt ends with ``"Assistant:"``; generation also stops at
``"\\nUser:"`` so the model does not write the user's next turn.

This module knows nothing about HTTP servers, processes or the engine's internals.
"""

from __future__ import annotations

import dataclasses
import json
import time
import types
import typing
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from nextoken.serve.engine.sampler import SamplingParams
from nextoken.serve.http import schema

MAX_STOP = schema.MAX_STOP
MAX_TOP_LOGPROBS = schema.MAX_TOP_LOGPROBS
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's completions default
# Jinja equivalent of chat_prompt (Hugging Face's chat_template convention); /tokenizer_info serves it.
# Written without whitespace control and with the newline as an expression, so it renders the same text
# under Jinja's defaults, lm-eval's environment and Hugging Face's (trim_blocks, lstrip_blocks).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'developer') %}System{% else %}{{ message['role'] | capitalize }}{% endif %}"
    ": {% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# Fields the request log records (accepted, and written nowhere else).
RECORDED = ("user", "metadata", "safety_identifier", "prompt_cache_key")


class RequestError(Exception):
    """A client error, answered with ``{"error": {message, type, param, code}}``."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_value", status: int = 400,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def loads_json(data: bytes | bytearray) -> Any:
    """Strict JSON: ``NaN`` and ``Infinity`` (which Python's parser accepts) are refused."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(data, parse_constant=refuse)


# --- pydantic errors --> 400 bodies -------------------------------------------------------------
# A field whose every element is one setting: an error inside it names the field, like OpenAI's params.
_WHOLE = frozenset({"stop", "prompt", "stop_token_ids", "logit_bias", "guided_choice", "guided_json", "tokens",
                    "metadata", "modalities", "content", "tools", "schema"})
# Why a known field is refused, for the fields accepted only at their default.
_UNSUPPORTED = {
    "audio": "audio output is not supported",
    "modalities": 'only the "text" modality is supported',
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this is not a reasoning model",
    "verbosity": "verbosity is not supported",
    "web_search_options": "web search is not supported",
    "moderation": "moderation is not supported",
    "store": "completions are not stored (store must be false)",
    "service_tier": 'one service tier is served: "auto" or "default"',
    "prompt_cache_retention": "prompt cache retention is not supported",
    "prompt_cache_options": "prompt cache options are not supported",
    "parallel_tool_calls": "function calling is not supported",
    "functions": "function calling is not supported",
    "include_obfuscation": "stream obfuscation is not supported",
    "use_beam_search": "beam search is not supported",
    "length_penalty": "length_penalty applies to beam search, which is not supported",
    "include_stop_str_in_output": "stop strings are never included in the output",
    "truncate_prompt_tokens": "prompts are not truncated (a prompt that does not fit is refused)",
    "allowed_token_ids": "allowed_token_ids is not supported; use logit_bias",
    "bad_words": "bad_words is not supported; use logit_bias",
    "prompt_logprobs": "prompt_logprobs is not supported in vLLM's shape; use echo with logprobs",
    "echo": "echo is only supported on /v1/completions",
    "suffix": "suffix (insertion) is not supported",
}


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


def _describe(err: dict[str, Any], name: str, model: type[BaseModel]) -> tuple[str, str]:
    """One pydantic error as (message, code), in the server's words."""
    t, v, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    field_name = str(err["loc"][-1]) if err["loc"] else name
    top = str(err["loc"][0]) if err["loc"] else name
    if t == "missing":
        return f"{name} is required", "missing_required_parameter"
    if t in _REFUSALS and (field_name in _UNSUPPORTED or top in _UNSUPPORTED):
        why = _UNSUPPORTED.get(field_name) or _UNSUPPORTED[top]
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


def request_error(exc: ValidationError, model: type[BaseModel]) -> RequestError:
    err = exc.errors(include_url=False)[0]
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


# --- the parsed request ---------------------------------------------------------------------------
@dataclass
class Prompt:
    """One prompt: text (a completions string or the rendered chat) or token ids fed as given."""

    text: str | None = None
    ids: list[int] | None = None


@dataclass
class GenerationRequest:
    endpoint: str  # "completions" | "chat"
    prompts: list[Prompt]
    n: int = 1
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields every choice shares
    max_tokens: int | None = None  # None = the rest of the context
    min_tokens: int = 0
    echo: bool = False
    logprobs: int | None = None  # None = none; N = top alternatives (chat: top_logprobs)
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    add_special_tokens: bool = True
    structured: dict[str, Any] = field(default_factory=dict)  # response_format / guided_* fields as sent
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    service_tier: str | None = None
    recorded: dict[str, Any] = field(default_factory=dict)  # accepted-and-recorded metadata (request log)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def prompt(self) -> str | None:  # the single prompt's text (older callers)
        return self.prompts[0].text if len(self.prompts) == 1 else None


def chat_prompt(messages: list[schema.ChatMessage] | list[dict[str, Any]], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> str:
    """The chat template (see the module docstring); ``CHAT_TEMPLATE`` renders the same text."""
    parts = []
    for m in messages:
        if isinstance(m, dict):
            m = schema.ChatMessage.model_validate(m)
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        parts.append(f"{CHAT_ROLES[m.role]}: {content}\n")
    if continue_final_message:
        return "".join(parts)[:-1]
    return "".join(parts) + ("Assistant:" if add_generation_prompt else "")


STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "guided_whitespace_pattern")


def _structured(r: schema._Generation) -> dict[str, Any]:
    """The structured-output fields that were given, as JSON values (the grammar module reads them)."""
    out = {}
    for name in STRUCTURED_FIELDS:
        v = getattr(r, name)
        if v is not None:
            out[name] = v.model_dump(by_alias=True, exclude_none=True) if isinstance(v, BaseModel) else v
    return out


def parse_request(body: Any, endpoint: str) -> GenerationRequest:
    """Validate a decoded JSON body into a GenerationRequest (context and vocabulary checks come later)."""
    r: schema.CompletionRequest | schema.ChatCompletionRequest
    if endpoint == "chat":
        r = validate(schema.ChatCompletionRequest, body)
        if r.tools is not None and r.tool_choice != "none":
            raise RequestError('function calling is not supported: tools are accepted only with tool_choice "none"',
                               param="tools", code="unsupported_parameter")
        if r.tool_choice not in (None, "none"):
            raise RequestError('function calling is not supported: tool_choice must be "none"', param="tool_choice",
                               code="unsupported_parameter")
        if r.function_call not in (None, "none"):
            raise RequestError('function calling is not supported: function_call must be "none"',
                               param="function_call", code="unsupported_parameter")
        prompts = [Prompt(text=chat_prompt(r.messages))]
        max_tokens = r.max_completion_tokens if r.max_completion_tokens is not None else r.max_tokens
        if r.top_logprobs is not None and not r.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (r.top_logprobs or 0) if r.logprobs else None
        echo = False
        stop_extra = [CHAT_STOP]
        recorded = {k: getattr(r, k) for k in RECORDED if getattr(r, k) is not None}
        service_tier = r.service_tier
    else:
        r = validate(schema.CompletionRequest, body)
        p = r.prompt
        if isinstance(p, str):
            prompts = [Prompt(text=p)]
        elif isinstance(p[0], str):
            prompts = [Prompt(text=s) for s in p]
        elif isinstance(p[0], int):
            prompts = [Prompt(ids=list(p))]
        else:
            prompts = [Prompt(ids=list(ids)) for ids in p]
        echo = bool(r.echo)
        max_tokens = DEFAULT_COMPLETION_TOKENS if r.max_tokens is None else r.max_tokens
        if max_tokens == 0 and not echo:
            raise RequestError("max_tokens must be >= 1 (0 only with echo: true, to score the prompt)",
                               param="max_tokens")
        logprobs = r.logprobs
        stop_extra = []
        recorded = {"user": r.user} if r.user is not None else {}
        service_tier = None
        n = r.n or 1
        if r.best_of is not None and r.best_of != n:
            raise RequestError(f"best_of must equal n ({n}): every generated choice is returned, none is ranked "
                               f"away; got {r.best_of}", param="best_of", code="unsupported_value")
    stream = bool(r.stream)
    if r.stream_options is not None and not stream:
        raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
    min_tokens = r.min_tokens or 0
    if max_tokens is not None and min_tokens > max_tokens:
        raise RequestError(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens")
    stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
    sampling = {
        "temperature": 1.0 if r.temperature is None else r.temperature,
        "top_p": 1.0 if r.top_p is None else r.top_p,
        "top_k": max(r.top_k or 0, 0),
        "min_p": r.min_p or 0.0,
        "repetition_penalty": 1.0 if r.repetition_penalty is None else r.repetition_penalty,
        "presence_penalty": r.presence_penalty or 0.0,
        "frequency_penalty": r.frequency_penalty or 0.0,
        "stop": stop + stop_extra,
        "logprobs": logprobs,
        "ignore_eos": bool(r.ignore_eos),
    }
    return GenerationRequest(
        endpoint=endpoint, prompts=prompts, n=r.n or 1, sampling=sampling, max_tokens=max_tokens,
        min_tokens=min_tokens, echo=echo, logprobs=logprobs, stream=stream,
        include_usage=bool(r.stream_options and r.stream_options.include_usage), model=r.model,
        add_special_tokens=r.add_special_tokens is not False, structured=_structured(r),
        logit_bias={int(k): float(v) for k, v in (r.logit_bias or {}).items()},
        stop_token_ids=list(r.stop_token_ids or []), seed=r.seed, service_tier=service_tier, recorded=recorded)


# --- planning: one engine request per choice ----------------------------------------------------
class TokenizerView(Protocol):
    """What planning needs from the served model (``api.ServedModel`` has it)."""

    context: int
    eos_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class Choice:
    """One engine request: a prompt as fed, its settings, and what the response echoes."""

    index: int  # OpenAI's: prompt index x n + j
    prompt_index: int
    prompt_ids: list[int]  # exactly what the model is fed
    echo_ids: list[int]  # the prompt's own tokens (prompt_ids without the implicit <|endoftext|>)
    prompt_text: str | None  # a text prompt (re-tokenized by the worker if the model version changes)
    params: SamplingParams | None  # None: nothing to run (echo with max_tokens 0 and no logprobs)
    echo_text: str = ""

    @property
    def needs_engine(self) -> bool:
        return self.params is not None


def choice_seed(seed: int | None, j: int) -> int | None:
    """Choice j's seed: the request's own for j = 0 (so n = 1 is unchanged), a splitmix64 hash of (seed, j) after."""
    if seed is None or j == 0:
        return seed
    z = (seed + 0x9E3779B97F4A7C15 * j) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (z ^ (z >> 31)) >> 1  # 63 bits: any integer seed field takes it


def sampling_params(fields: dict[str, Any]) -> SamplingParams:
    """Build the engine's settings; a field this engine's SamplingParams lacks is refused, not dropped."""
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    for name, value in fields.items():
        if name not in known and value not in (None, 0, 0.0, [], {}, False):
            param = {"structured": "response_format", "prompt_logprobs": "echo"}.get(name, name)
            raise RequestError(f"{param} is not supported by this server's engine yet", param=param,
                               code="unsupported_parameter")
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if k in known})
    except ValueError as e:  # the engine's own guard (SamplingParamError names the field)
        raise RequestError(str(e), param=getattr(e, "param", None)) from None


def structured_spec(fields: dict[str, Any]) -> Any:
    """The grammar module's spec for a request's structured-output fields (None: plain text), validated.

    GrammarError (a ValueError naming its param) becomes a 400 naming it.
    """
    if not fields:
        return None
    try:
        from nextoken.serve import grammar
    except ImportError:  # llguidance missing from this install
        param = next(iter(fields))
        raise RequestError(f"{param} is not supported by this server (no grammar engine installed)", param=param,
                           code="unsupported_parameter") from None
    try:
        spec = grammar.spec_from_request(fields)
        if spec is not None:
            grammar.validate(spec)
    except ValueError as e:
        raise RequestError(str(e), param=getattr(e, "param", None) or next(iter(fields))) from None
    return spec


def plan_choices(req: GenerationRequest, tok: TokenizerView, *, structured: Any = None) -> list[Choice]:
    """One Choice per prompt and n, in OpenAI's index order; every model-dependent check happens here."""
    vocab = tok.vocab_size
    for name, ids in (("logit_bias", list(req.logit_bias)), ("stop_token_ids", req.stop_token_ids)):
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise RequestError(f"{name} token ids must be < the vocabulary size {vocab}, got {bad[0]}", param=name)
    param_prompt = "messages" if req.endpoint == "chat" else "prompt"
    choices: list[Choice] = []
    for pi, p in enumerate(req.prompts):
        if p.ids is not None:
            bad = [t for t in p.ids if t >= vocab]
            if bad:
                raise RequestError(f"prompt token ids must be in [0, {vocab}), got {bad[0]}", param="prompt")
            own, fed = list(p.ids), list(p.ids)
            text = None
        else:
            own = tok.encode(p.text)
            fed = [tok.eos_id] + own if req.add_special_tokens else own
            text = p.text
            if not fed:
                raise RequestError("the prompt is empty after tokenization", param=param_prompt)
        context = tok.context
        max_tokens = context - len(fed) if req.max_tokens is None else req.max_tokens
        where = f" (prompt {pi})" if len(req.prompts) > 1 else ""
        room = 0 if req.max_tokens == 0 else 1  # the prompt must leave room for one token, unless scored only
        if len(fed) + room > context:
            raise RequestError(f"the prompt{where} is {len(fed)} tokens long; this model's context is {context} "
                               "tokens", param=param_prompt, code="context_length_exceeded")
        if len(fed) + max_tokens > context:
            raise RequestError(f"prompt{where} ({len(fed)} tokens) + max_tokens ({max_tokens}) = "
                               f"{len(fed) + max_tokens} exceeds this model's context of {context} tokens",
                               param="max_tokens", code="context_length_exceeded")
        if req.min_tokens > max_tokens:
            raise RequestError(f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
                               param="min_tokens")
        echo_text = "" if not req.echo else (p.text if p.text is not None else tok.decode(own))
        scored_only = req.echo and max_tokens == 0 and req.logprobs is None  # the echo is the whole answer
        for j in range(req.n):
            params = None
            if not scored_only:
                fields = dict(req.sampling, max_tokens=max_tokens, min_tokens=req.min_tokens,
                              seed=choice_seed(req.seed, j), logit_bias=dict(req.logit_bias),
                              stop_token_ids=list(req.stop_token_ids))
                if req.echo and req.logprobs is not None:
                    fields["prompt_logprobs"] = req.logprobs
                if structured is not None:
                    fields["structured"] = structured
                params = sampling_params(fields)
            choices.append(Choice(pi * req.n + j, pi, fed, own, text, params, echo_text))
    return choices


# --- responses ---------------------------------------------------------------------------------
def new_id(endpoint: str) -> str:
    return ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(items: list[dict[str, Any] | None], offset: int,
                        tokens: list[str] | None = None) -> dict[str, Any]:
    """OpenAI's legacy shape; an item of None (a token with nothing before it) has null logprobs."""
    out_tokens, lps, tops, offsets = [], [], [], []
    for i, it in enumerate(items):
        token = tokens[i] if tokens is not None else it["token"]
        out_tokens.append(token)
        lps.append(None if it is None else it["logprob"])
        tops.append({t[0]: t[2] for t in it["top"]} if it is not None and it["top"] else None)
        offsets.append(offset)
        offset += len(token)
    return {"tokens": out_tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's chat shape; ``bytes`` are the token's own bytes (part of a character for byte-level BPE)."""

    def entry(token: str, lp: float, raw: list[int] | None) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": raw if raw is not None else list(token.encode("utf-8"))}

    return {"content": [dict(entry(it["token"], it["logprob"], it.get("bytes")),
                             top_logprobs=[entry(t[0], t[2], t[3] if len(t) > 3 else None) for t in it["top"]])
                        for it in items]}


@dataclass
class ChoiceState:
    """What one choice has produced so far (non-streaming answers keep all of it)."""

    choice: Choice
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    text_offset: int = 0  # streaming: characters sent so far (completions' text_offset)
    started: bool = False  # streaming: the first chunk (role, echo) is out


class ResponseBuilder:
    """Chunks and final bodies for one response over all its choices; every chunk shares one id."""

    def __init__(self, endpoint: str, model: str, *, echo: bool = False, logprobs: bool = False,
                 service_tier: str | None = None, token_text: Any = None) -> None:
        self.endpoint = endpoint
        self.model = model
        self.id = new_id(endpoint)
        self.created = int(time.time())
        self.echo = echo
        self.want_logprobs = logprobs
        self.service_tier = "default" if service_tier is not None else None
        self.token_text = token_text  # id -> token string, for echoed tokens the engine gave no entry

    def _head(self, obj: str) -> dict[str, Any]:
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        if self.endpoint == "chat" and self.service_tier is not None:
            head["service_tier"] = self.service_tier
        return head

    def _echo_logprobs(self, st: ChoiceState) -> dict[str, Any]:
        """The prompt part of completions logprobs: one entry per echoed token (None before any context)."""
        c = st.choice
        entries = st.prompt_logprobs
        if entries is None:
            raise RuntimeError("the engine returned no prompt logprobs for an echo request")
        skip = len(c.prompt_ids) - len(c.echo_ids)  # the implicit <|endoftext|> is fed, not echoed
        items = list(entries[skip:skip + len(c.echo_ids)])
        tokens = [it["token"] if it is not None else self.token_text(t) for it, t in zip(items, c.echo_ids,
                                                                                          strict=True)]
        return completion_logprobs(items, 0, tokens)

    def _completion_logprobs(self, st: ChoiceState, items: list[dict[str, Any]], first: bool) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        gen = completion_logprobs(items, st.text_offset + (len(st.choice.echo_text) if first and self.echo else 0))
        if not (first and self.echo):
            return gen
        head = self._echo_logprobs(st)
        return {k: head[k] + gen[k] for k in head}

    def chunk(self, st: ChoiceState, text: str, token_ids: list[int], logprobs: list[dict[str, Any]] | None,
              finish_reason: str | None) -> dict[str, Any]:
        """One streamed event of one choice; call with every event in order (it tracks offsets)."""
        first = not st.started
        st.started = True
        c = st.choice
        if self.endpoint == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else (
                {"content": text} if text or finish_reason is None else {})
            choice: dict[str, Any] = {"index": c.index, "delta": delta,
                                      "logprobs": chat_logprobs(logprobs) if logprobs else None,
                                      "finish_reason": finish_reason, "token_ids": token_ids}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        lp = self._completion_logprobs(st, logprobs or [], first) if (logprobs or (first and self.echo)) else None
        if lp is not None and not lp["tokens"]:
            lp = None
        shown = (c.echo_text if first and self.echo else "") + text
        st.text_offset += len(shown)
        choice = {"index": c.index, "text": shown, "logprobs": lp, "finish_reason": finish_reason,
                  "token_ids": token_ids}
        if first and self.echo:
            choice["prompt_token_ids"] = c.echo_ids
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def final(self, states: list[ChoiceState], prompt_tokens: int) -> dict[str, Any]:
        """The whole answer: every choice in index order, usage over all of them."""
        completion_tokens = sum(st.completion_tokens for st in states)
        choices = []
        for st in sorted(states, key=lambda s: s.choice.index):
            text = "".join(st.text)
            if self.endpoint == "chat":
                choices.append({"index": st.choice.index, "message": {"role": "assistant", "content": text},
                                "logprobs": chat_logprobs(st.logprobs) if st.logprobs is not None else None,
                                "finish_reason": st.finish_reason, "token_ids": st.token_ids})
                continue
            lp = None
            if self.want_logprobs:
                gen = completion_logprobs(st.logprobs or [], len(st.choice.echo_text) if self.echo else 0)
                if self.echo:
                    head = self._echo_logprobs(st)
                    gen = {k: head[k] + gen[k] for k in head}
                lp = gen
            choice = {"index": st.choice.index, "text": (st.choice.echo_text if self.echo else "") + text,
                      "logprobs": lp, "finish_reason": st.finish_reason, "token_ids": st.token_ids}
            if self.echo:
                choice["prompt_token_ids"] = st.choice.echo_ids
            choices.append(choice)
        obj = "chat.completion" if self.endpoint == "chat" else "text_completion"
        return {**self._head(obj), "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
