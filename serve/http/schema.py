"""Pydantic models of every HTTP route's request and response bodies: the validation and the OpenAPI document.

A request body is validated by ``Model.model_validate`` on the decoded JSON (strict: ``"1"`` is not a
number, ``true`` is not an integer), and ``/openapi.json`` is generated from the same models, so the
schema states exactly the constraints the server enforces: ranges, enums, list lengths, which keys a
map may have. ``protocol.validate`` turns a ``ValidationError`` into the OpenAI-style 400 body naming
``param``, with messages like ``temperature must be in [0, 2], got 3``.

Decisions the schema states:

* Unknown request fields are ignored (``additionalProperties: true``), as vLLM does, so clients that
  send newer OpenAI fields keep working. Known fields the server cannot honour (``audio``, ``tools``
  without ``tool_choice: "none"``, vLLM's ``use_beam_search`` ...) are declared with the only values
  it accepts (``null``, ``false``), so a request that asks for them gets a 400 naming them instead of
  being silently ignored.
* Response bodies are closed (``additionalProperties: false``): a client generated from the schema
  sees every field the server sends.
* Limits that depend on the model being served (context length, vocabulary size) are not in these
  classes; ``openapi.py`` writes them into the document for the version serving now, and
  ``protocol.plan_choices`` checks them.
* Cross-field rules a JSON Schema cannot state plainly (``best_of == n``, ``min_tokens <= max_tokens``,
  ``top_logprobs`` needs ``logprobs``, one structured-output field at most) are checked after the
  model validates and are listed in the field descriptions; they answer 400 like the rest.

This module knows nothing about tokenizers, models or the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_N = 128  # OpenAI's bound; the server's capacity bounds n x prompts further (a 400 naming n)
MAX_PROMPTS = 1024  # prompts in one completions request (lm-eval batches tens)
MAX_LOGIT_BIAS = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 4096
MAX_METADATA = 16  # OpenAI's metadata limits: 16 pairs, keys <= 64 and values <= 512 characters
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1
LOGIT_BIAS_KEY = r"^[0-9]{1,10}$"
CHAT_ROLES = ("system", "developer", "user", "assistant")


def _only(value: bool) -> Any:
    """A boolean that must be ``value`` (``Literal[False]`` would take 0, which equals False in Python)."""

    def check(v: bool) -> bool:
        if v is not value:
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": str(value).lower()})
        return v

    return Annotated[StrictBool, AfterValidator(check), WithJsonSchema({"type": "boolean", "const": value})]


OnlyFalse = _only(False)

# pydantic-core refuses a lone surrogate ("\ud800", valid JSON but no tokenizer takes it): string_unicode.
Text = StrictStr
NonEmptyText = Annotated[StrictStr, Field(min_length=1)]
TokenId = Annotated[StrictInt, Field(ge=0)]


def _number(lo: float, hi: float, *, lo_open: bool = False, description: str) -> Any:
    if lo_open:
        return Field(default=None, gt=lo, le=hi, allow_inf_nan=False, description=description)
    return Field(default=None, ge=lo, le=hi, allow_inf_nan=False, description=description)


def _union(message: str, pick: Any = None) -> WrapValidator:
    """Validate a union, but name the mistake in one sentence instead of one error per member.

    ``message`` follows the field's name (``must be a string or ...``). ``pick(value, errors)`` may return
    the errors of the one member that matches what the client sent (the list member for a list): the
    first is reported with its own detail (``stop may hold at most 4 items, got 5``); otherwise
    ``message`` is.
    """

    def validate(v: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(v)
        except ValidationError as e:
            errors = e.errors(include_url=False)
            chosen = pick(v, errors) if pick is not None else None
            if chosen:
                inner = chosen[0]
                raise PydanticCustomError("union_member", "{message}", {"message": inner["msg"], "inner": inner}) \
                    from None
            raise PydanticCustomError("union_type", "{message}", {"message": message}) from None

    return WrapValidator(validate)


def _json_kind(v: Any) -> str:
    return ("list" if isinstance(v, list) else "object" if isinstance(v, dict) else "string" if isinstance(v, str)
            else "other")


def _tag_kind(tag: str) -> str:
    """The JSON kind a union member's error tag stands for (pydantic names members by their types)."""
    if tag.startswith("list["):
        return "list"
    if tag in ("str", "constrained-str") or tag.startswith("literal["):
        return "string"
    if tag[:1].isupper() or tag.startswith("dict["):  # a model class, or a map
        return "object"
    return "other"


def _pick(v: Any, errors: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The errors of the union member that has the JSON kind of what the client sent.

    Several list members (strings, token ids, token-id lists) are told apart by the first element.
    """
    kind = _json_kind(v)
    found = [e for e in errors if e["loc"] and _tag_kind(str(e["loc"][0])) == kind]
    if kind == "list" and v and len({e["loc"][0] for e in found}) > 1:
        inner = {"list": "list[list[", "string": ("list[str", "list[constrained-str"),
                 "other": ("list[int", "list[constrained-int")}.get(_json_kind(v[0]))
        found = [e for e in found if inner and str(e["loc"][0]).startswith(inner)]
    if kind == "object" and len({e["loc"][0] for e in found}) > 1:
        return None  # which object member was meant is a guess: say what the field takes instead
    return [dict(e, loc=e["loc"][1:]) for e in found] or None


StopField = Annotated[
    NonEmptyText | Annotated[list[NonEmptyText], Field(max_length=MAX_STOP)] | None,
    _union(f"must be a string or a list of at most {MAX_STOP} strings", _pick),
]


LogitBias = Annotated[
    dict[Annotated[StrictStr, Field(pattern=LOGIT_BIAS_KEY)],
         Annotated[StrictFloat, Field(ge=-100, le=100, allow_inf_nan=False)]],
    Field(max_length=MAX_LOGIT_BIAS),
    WithJsonSchema({"type": "object", "maxProperties": MAX_LOGIT_BIAS, "additionalProperties": False,
                    "patternProperties": {LOGIT_BIAS_KEY: {"type": "number", "minimum": -100, "maximum": 100}}}),
]


class _Open(BaseModel):
    """Request bodies: strict types, unknown fields ignored (vLLM's choice)."""

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={"additionalProperties": True})


class _Closed(BaseModel):
    """Nested request objects and every response body: exactly these fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Closed):
    include_usage: StrictBool | None = Field(
        default=None, description="Send one more chunk before `[DONE]` with the usage of the whole request "
                                  "(all choices) and an empty `choices` list.")
    include_obfuscation: OnlyFalse | None = Field(
        default=None, description="Not supported: chunks carry no obfuscation padding (only false or null).")


# --- structured output -----------------------------------------------------------------------
class JsonSchemaSpec(_Closed):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = Field(
        description="The schema's name (letters, digits, `_` and `-`, at most 64).")
    description: Text | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema the output matches.")
    strict: StrictBool | None = Field(
        default=None, description="Accepted either way: the output always matches the schema exactly "
                                  "(the grammar is enforced on every token).")

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class ResponseFormatText(_Closed):
    type: Literal["text"]


class ResponseFormatJsonObject(_Closed):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(_Closed):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


def _pick_format_member(v: Any, errors: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    if isinstance(v, dict) and v.get("type") in ("text", "json_object", "json_schema"):
        return [dict(e, loc=e["loc"][1:]) for e in errors if e["loc"] and e["loc"][0] == v["type"]]
    return None


ResponseFormat = Annotated[
    Annotated[ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")]
    | None,
    _union('must be an object with type "text", "json_object" or "json_schema"',
           _pick_format_member),
]


# --- tools (refused unless tool_choice is "none") ----------------------------------------------
class FunctionDefinition(_Closed):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Closed):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Closed):
    name: StrictStr


class NamedToolChoice(_Closed):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Annotated[
    Literal["none", "auto", "required"] | NamedToolChoice | None,
    _union('must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
           _pick),
]
FunctionCall = Annotated[
    Literal["none", "auto"] | NamedFunction | None,
    _union('must be "none", "auto" or {"name": ...}', _pick),
]


# --- the fields both generation routes share -------------------------------------------------
class _Generation(_Open):
    model: Text | None = Field(default=None, description="The served model's id or name (see /v1/models); "
                                                         "absent = the one served. Anything else is a 404.")
    temperature: StrictFloat | None = _number(0, 2, description="0 = greedy. Default 1.")
    top_p: StrictFloat | None = _number(0, 1, lo_open=True, description="Nucleus sampling. Default 1.")
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = Field(
        default=None, description="vLLM extension: keep the k most likely tokens; 0 or -1 = off (the default).")
    min_p: StrictFloat | None = _number(0, 1, description="vLLM extension: drop tokens whose probability is below "
                                                          "min_p times the most likely one's. Default 0.")
    repetition_penalty: StrictFloat | None = _number(
        0, 10, lo_open=True, description="vLLM extension (Hugging Face's): > 1 discourages tokens already in the "
                                         "prompt or output. Default 1.")
    presence_penalty: StrictFloat | None = _number(-2, 2, description="OpenAI's. Default 0.")
    frequency_penalty: StrictFloat | None = _number(-2, 2, description="OpenAI's. Default 0.")
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = Field(
        default=None, description="vLLM extension: end-of-text and `stop_token_ids` cannot end the output before "
                                  "this many tokens (at most max_tokens). Default 0.")
    stop: StopField = Field(default=None, description=f"Up to {MAX_STOP} strings; the output ends before the first "
                                                      "one and never contains it.")
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = Field(
        default=None, description="vLLM extension: token ids that end the output (the stop token is generated and "
                                  "returned, text included, as vLLM does). Each must be below the vocabulary size.")
    seed: Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)] | None = Field(
        default=None, description="Same seed, same request = same output, alone or in any batch. With n > 1, "
                                  "choice j is seeded from (seed, j), so every choice differs and each is "
                                  "reproducible.")
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = Field(
        default=None, description="Choices per prompt, each sampled independently. n x prompts must fit the "
                                  "server's capacity (running + queued requests).")
    logit_bias: LogitBias | None = Field(
        default=None, description="Token id (as a string) -> bias in [-100, 100] added to its logit before "
                                  "sampling; -100 bans a token, 100 all but forces it. Ids must be below the "
                                  "vocabulary size.")
    ignore_eos: StrictBool | None = Field(default=None, description="vLLM extension: keep generating after "
                                                                    "end-of-text (benchmarks).")
    stream: StrictBool | None = Field(default=None, description="Answer with server-sent events, one chunk per "
                                                                "step and choice, then `data: [DONE]`.")
    stream_options: StreamOptions | None = Field(default=None, description="Only with stream: true.")
    add_special_tokens: StrictBool | None = Field(
        default=None, description="vLLM extension: a text prompt starts after <|endoftext|> (the document "
                                  "separator the model was trained with); false feeds the text alone. Default true.")
    response_format: ResponseFormat = Field(
        default=None, description="json_object: the output is one JSON object; json_schema: it matches the "
                                  "schema; enforced on every token by the grammar engine.")
    guided_json: dict[str, Any] | Text | None = Field(
        default=None, description="vLLM extension: a JSON Schema (object or JSON text) the output matches.")
    guided_regex: NonEmptyText | None = Field(default=None, description="vLLM extension: the output matches this "
                                                                         "regular expression.")
    guided_choice: Annotated[list[NonEmptyText], Field(min_length=1, max_length=256)] | None = Field(
        default=None, description="vLLM extension: the output is exactly one of these strings.")
    user: Annotated[Text, Field(max_length=256)] | None = Field(
        default=None, description="Accepted and recorded: written to the request log (logger "
                                  "nextoken.serve.requests, at --log-level info).")
    # Known vLLM extensions this server cannot honour: only their default values are accepted.
    use_beam_search: OnlyFalse | None = Field(default=None, description="Not supported (only false).")
    length_penalty: Annotated[StrictFloat, Field(ge=1, le=1)] | None = Field(
        default=None, description="Beam search only: not supported (only 1).")
    include_stop_str_in_output: OnlyFalse | None = Field(default=None, description="Not supported: stop "
                                                                                         "strings are never "
                                                                                         "returned (only false).")
    truncate_prompt_tokens: None = Field(default=None, description="Not supported: a prompt that does not fit is "
                                                                   "a 400 (only null).")
    allowed_token_ids: None = Field(default=None, description="Not supported (only null); use logit_bias.")
    bad_words: None = Field(default=None, description="Not supported (only null); use logit_bias.")
    prompt_logprobs: None = Field(default=None, description="Not supported in vLLM's shape (only null): use echo "
                                                            "with logprobs on /v1/completions.")
    guided_grammar: NonEmptyText | None = Field(
        default=None, description="vLLM extension: a Lark or GBNF grammar the output matches.")
    guided_whitespace_pattern: NonEmptyText | None = Field(
        default=None, description="vLLM extension: the whitespace allowed between JSON tokens (a regex), with a "
                                  "JSON structure only. Default: 1-16 JSON whitespace characters.")


PromptField = Annotated[
    NonEmptyText
    | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_PROMPTS)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)],
    _union("must be a string, a list of strings, a list of token ids or a list of token-id lists",
           _pick),
]


class CompletionRequest(_Generation):
    """POST /v1/completions."""

    prompt: PromptField = Field(description="One prompt (text or token ids) or a batch (a list of strings or of "
                                            "token-id lists). Choice index = prompt index x n + j. Token ids are "
                                            "fed exactly as given; text starts after <|endoftext|> unless "
                                            "add_special_tokens is false.")
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = Field(
        default=None, description="Tokens to generate per choice (default 16); prompt + max_tokens must fit the "
                                  "context. 0 only with echo: score the prompt, generate nothing.")
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        default=None, description="Return each token's log-probability and the N most likely alternatives (the "
                                  "model's own distribution, before sampling settings). With echo, the prompt's "
                                  "tokens come first; a token with nothing before it has null.")
    echo: StrictBool | None = Field(default=None, description="Prepend the prompt to each choice's text (and, with "
                                                              "logprobs, its tokens' log-probabilities).")
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = Field(
        default=None, description="Only equal to n (every generated choice is returned; none is ranked away).")
    suffix: Annotated[StrictStr, Field(max_length=0)] | None = Field(
        default=None, description="Not supported: insertion needs a model trained for it (only null or \"\").")


class ContentPart(_Closed):
    type: Literal["text"]
    text: Text


MessageContent = Annotated[
    Text | Annotated[list[ContentPart], Field(max_length=4096)],
    _union("must be a string or a list of text parts", _pick),
]


class ChatMessage(BaseModel):
    """One message. Tool and function messages need function calling, which is not supported."""

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={"additionalProperties": True})

    role: Literal["system", "developer", "user", "assistant"]
    content: MessageContent = Field(description="Text, or OpenAI's content parts (text parts only).")
    name: Text | None = Field(default=None, description="Accepted; the chat template does not show names.")


class ChatCompletionRequest(_Generation):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] = Field(
        description='Rendered as "{Role}: {content}\\n" per message (System, User, Assistant; developer = '
                    'System), then "Assistant:"; generation also stops at "\\nUser:".')
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="Tokens to generate per choice; default: the rest of the context.")
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="OpenAI's newer name for max_tokens; wins when both are given.")
    logprobs: StrictBool | None = Field(default=None, description="Return each output token's log-probability.")
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        default=None, description="The N most likely alternatives per token; needs logprobs: true.")
    tools: Annotated[list[Tool], Field(max_length=128)] | None = Field(
        default=None, description="Function calling is not supported: accepted only with tool_choice \"none\" "
                                  "(the model is then not offered them).")
    tool_choice: ToolChoice = Field(default=None, description='Only "none" is supported.')
    parallel_tool_calls: None = Field(default=None, description="Function calling is not supported (only null).")
    functions: None = Field(default=None, description="Function calling is not supported (only null).")
    function_call: FunctionCall = Field(default=None, description='Only "none" is supported.')
    audio: None = Field(default=None, description="Audio output is not supported (only null).")
    modalities: Annotated[list[Literal["text"]], Field(max_length=1)] | None = Field(
        default=None, description='Only ["text"].')
    prediction: None = Field(default=None, description="Predicted outputs are not supported (only null).")
    reasoning_effort: None = Field(default=None, description="Not a reasoning model (only null).")
    verbosity: None = Field(default=None, description="Not supported (only null).")
    web_search_options: None = Field(default=None, description="Web search is not supported (only null).")
    moderation: None = Field(default=None, description="Moderation is not supported (only null).")
    store: OnlyFalse | None = Field(default=None, description="Completions are not stored (only false).")
    service_tier: Literal["auto", "default"] | None = Field(
        default=None, description='One tier: "auto" and "default" are served as "default", which the response '
                                  'reports.')
    prompt_cache_retention: None = Field(default=None, description="Not supported (only null).")
    prompt_cache_options: None = Field(default=None, description="Not supported (only null).")
    metadata: Annotated[dict[Annotated[StrictStr, Field(max_length=64)], Annotated[Text, Field(max_length=512)]],
                        Field(max_length=MAX_METADATA)] | None = Field(
        default=None, description="Accepted and recorded in the request log (logger nextoken.serve.requests).")
    safety_identifier: Annotated[Text, Field(max_length=256)] | None = Field(
        default=None, description="Accepted and recorded in the request log.")
    prompt_cache_key: Annotated[Text, Field(max_length=256)] | None = Field(
        default=None, description="Accepted and recorded in the request log.")
    echo: OnlyFalse | None = Field(default=None, description="vLLM's chat echo is not supported (only false).")


# --- tokenizer routes (vLLM's shapes) ---------------------------------------------------------
class TokenizeCompletionRequest(_Open):
    """POST /tokenize with a prompt."""

    model: Text | None = None
    prompt: Text = Field(description="Text to tokenize.")
    add_special_tokens: StrictBool | None = Field(
        default=None, description="Default true: start with <|endoftext|>, as /v1/completions feeds a text prompt.")
    return_token_strs: StrictBool | None = Field(default=None, description="Also return each token's string.")


class TokenizeChatRequest(_Open):
    """POST /tokenize with messages: the chat template's tokens, as /v1/chat/completions feeds them."""

    model: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    add_generation_prompt: StrictBool | None = Field(default=None, description='Default true: end with "Assistant:".')
    continue_final_message: StrictBool | None = Field(
        default=None, description="End inside the last message (no newline after it, no generation prompt); "
                                  "not with add_generation_prompt: true.")
    add_special_tokens: StrictBool | None = Field(default=None, description="Default true: start with "
                                                                            "<|endoftext|>.")
    return_token_strs: StrictBool | None = None


class DetokenizeRequest(_Open):
    """POST /detokenize."""

    model: Text | None = None
    tokens: Annotated[list[TokenId], Field(max_length=1 << 20)] = Field(description="Token ids, each below the "
                                                                                    "vocabulary size.")


# --- responses ----------------------------------------------------------------------------------
class ErrorBody(_Closed):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Closed):
    """Every 4xx and 5xx answer."""

    error: ErrorBody


class Usage(_Closed):
    prompt_tokens: int = Field(description="Each prompt's tokens, counted once per prompt (not per choice).")
    completion_tokens: int = Field(description="Generated tokens, all choices together.")
    total_tokens: int


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(_Closed):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Closed):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    token_ids: list[int] = Field(description="The generated tokens (vLLM extension).")
    prompt_token_ids: list[int] | None = Field(default=None, description="With echo: the prompt's tokens.")


class CompletionResponse(_Closed):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Closed):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(_Closed):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Closed):
    content: list[TokenLogprob] | None


class AssistantMessage(_Closed):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Closed):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason
    token_ids: list[int]


class ChatCompletionResponse(_Closed):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    service_tier: Literal["default"] | None = None


class ChatDelta(_Closed):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Closed):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    token_ids: list[int]


class ChatCompletionChunk(_Closed):
    """One server-sent event of a streamed chat completion (``data: {...}``)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    service_tier: Literal["default"] | None = None


class CompletionChunk(_Closed):
    """One server-sent event of a streamed completion (``data: {...}``); the stream ends with ``data: [DONE]``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Closed):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    name: str
    version: str
    context_length: int
    max_model_len: int


class ModelList(_Closed):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Closed):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Closed):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """vLLM's /tokenizer_info: the tokenizer_config.json a Hugging Face tokenizer would load, plus what the
    server adds (vocab_size, the chat template lm-eval renders)."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str
    eos_token: str
    bos_token: str | None
    pad_token: str | None
    unk_token: str | None
    model_max_length: int
    vocab_size: int
    add_bos_token: bool
    chat_template: str


class HealthResponse(_Closed):
    status: Literal["ok", "loading", "draining", "failed"]
    model: str | None = None
    error: str | None = None


class ReloadResponse(_Closed):
    status: Literal["reload requested"]
    serving: str | None
    last_error: str | None
