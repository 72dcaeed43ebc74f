"""The field types the request models are made of: strict scalars, unions that name the mistake, nested objects.

Decisions they state (the request models and ``/openapi.json`` inherit them):

* Strict types: ``"1"`` is not a number, ``true`` is not an integer.
* Request bodies are open (unknown fields are ignored, as vLLM does, so clients that send newer OpenAI
  fields keep working); nested request objects and every response body are closed.
* A union names the mistake in one sentence (``stop must be a string or a list of at most 4 strings``),
  or the one member the client meant with its own detail (``stop may hold at most 4 items, got 5``).

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

from nextoken.serve.http.errors import refused

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


def _only(value: bool) -> Any:
    """A boolean that must be ``value`` (``Literal[False]`` would take 0, which equals False in Python)."""

    def check(v: bool) -> bool:
        if v is not value:
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": str(value).lower()})
        return v

    return Annotated[StrictBool, AfterValidator(check), WithJsonSchema({"type": "boolean", "const": value})]


OnlyFalse = _only(False)
OnlyTrue = _only(True)

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
                                  "(all choices) and an empty `choices` list. Default false, or true when "
                                  "continuous_usage_stats is true (vLLM's default).")
    continuous_usage_stats: StrictBool | None = Field(
        default=None, description="vLLM extension: every chunk also carries `usage` so far, of its own choice "
                                  "(its prompt, the tokens it has generated), as vLLM sends it. Needs "
                                  "include_usage not false.")
    include_obfuscation: OnlyFalse | None = Field(
        default=None, description=refused("include_obfuscation", "false or null"))


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


class StructuredOutputs(_Closed):
    """vLLM's ``structured_outputs`` (``StructuredOutputsParams``): exactly one constraint, and its options."""

    json_: dict[str, Any] | Text | None = Field(default=None, alias="json", description="A JSON Schema (object "
                                                "or JSON text) the output matches.")
    regex: NonEmptyText | None = Field(default=None, description="The output matches this regular expression.")
    choice: Annotated[list[NonEmptyText], Field(min_length=1, max_length=256)] | None = Field(
        default=None, description="The output is exactly one of these strings.")
    grammar: NonEmptyText | None = Field(default=None, description="A Lark or GBNF grammar the output matches.")
    json_object: OnlyTrue | None = Field(default=None, description="true: the output is one JSON object.")
    whitespace_pattern: NonEmptyText | None = Field(
        default=None, description="With json or json_object: the whitespace allowed between JSON tokens (a regex). "
                                  "Default: 1-16 JSON whitespace characters.")
    disable_any_whitespace: StrictBool | None = Field(
        default=None, description="With json or json_object: true allows no whitespace between JSON tokens.")
    disable_additional_properties: OnlyFalse | None = Field(
        default=None, description=refused("disable_additional_properties", "false"))
    structural_tag: None = Field(default=None, description=refused("structural_tag"))

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


PromptField = Annotated[
    NonEmptyText
    | Annotated[list[NonEmptyText], Field(min_length=1, max_length=MAX_PROMPTS)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)],
    _union("must be a string, a list of strings, a list of token ids or a list of token-id lists",
           _pick),
]


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
