"""The Responses API's request contract (``POST /v1/responses``), for text.

OpenAI's newer route, which its SDK and agent tooling call and llama.cpp's server and vLLM serve: an
``input`` (a string, or a list of messages whose content is text) and ``instructions`` instead of
``messages``, ``max_output_tokens``, ``text.format`` for structured output, and a typed event stream.
A valid request becomes the ``ChatCompletionRequest`` it amounts to (``to_chat``): instructions are
a system message first, then the input's messages, so it is planned, templated and sampled exactly
as the chat route's requests are (one path renders messages). Its answer is built by
``responses_builder.ResponsesBuilder``.

Responses are not stored, so what needs a stored response (``previous_response_id``,
``conversation``, ``background``, ``store: true``) is refused by name, as are tools, reasoning and
the fields only hosted models have; vLLM's ``ignore_eos``, ``stop`` and ``seed``, which load testers
send here too (guidellm does), are honoured as on the chat route.

This module knows nothing about tokenizers, models or the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

from nextoken.serve.http.errors import broken_rule, refused, validate
from nextoken.serve.http.fields import (
    MAX_MESSAGES,
    MAX_METADATA,
    SEED_MAX,
    SEED_MIN,
    NonEmptyText,
    OnlyFalse,
    StopField,
    Text,
    _Closed,
    _number,
    _Open,
    _pick,
    _union,
)
from nextoken.serve.http.refused_fields import OnlyZero
from nextoken.serve.http.requests import ChatCompletionRequest

# the chat request's fields -> the Responses API's, to name in a refusal (the input's messages start after the
# instructions' system message, so a message's index is not carried over)
CHAT_PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
               "response_format": "text.format"}


def responses_param(param: str | None) -> str | None:
    """A refusal's ``param`` as the Responses API names it (planning and the engine name the chat request's)."""
    if param is None:
        return None
    for chat, own in CHAT_PARAMS.items():
        if param == chat or param.startswith((chat + ".", chat + "[")):
            return own
    return param


class InputText(_Closed):
    type: Literal["input_text"]
    text: Text


class OutputTextIn(BaseModel):
    """An assistant's earlier output sent back as input (its annotations and logprobs are not read)."""

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={"additionalProperties": True})

    type: Literal["output_text"]
    text: Text


Part = Annotated[InputText | OutputTextIn, Field(discriminator="type")]
InputContent = Annotated[
    Text | Annotated[list[Part], Field(max_length=4096)],
    _union("must be a string or a list of input_text / output_text parts", _pick),
]


class InputMessage(BaseModel):
    """One message of ``input`` (an EasyInputMessage, or an output message sent back): text only."""

    model_config = ConfigDict(strict=True, extra="ignore", json_schema_extra={"additionalProperties": True})

    type: Literal["message"] | None = Field(default=None, description='Only messages: tool calls and their '
                                                                      'outputs need tools.')
    role: Literal["user", "assistant", "system", "developer"]
    content: InputContent = Field(description="Text, or input_text / output_text parts (no images or files).")

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FormatText(_Closed):
    type: Literal["text"]


class FormatJsonObject(_Closed):
    type: Literal["json_object"]


class FormatJsonSchema(_Closed):
    type: Literal["json_schema"]
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    schema_: dict[str, Any] = Field(alias="schema", description="The JSON Schema the output matches.")
    description: Text | None = None
    strict: StrictBool | None = Field(default=None, description="Accepted either way: the grammar engine enforces "
                                                                "the schema on every token.")

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)


class TextConfig(_Closed):
    format: Annotated[FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")] | None = Field(
        default=None, description="json_schema / json_object: enforced on every token by the grammar engine.")
    verbosity: None = Field(default=None, description=refused("verbosity"))


class ResponsesStreamOptions(_Closed):
    include_obfuscation: OnlyFalse | None = Field(default=None,
                                                  description=refused("include_obfuscation", "false or null"))


class ResponsesRequest(_Open):
    """POST /v1/responses."""

    endpoint: ClassVar[str] = "responses"

    model: Text | None = Field(default=None, description="The served model's id or name; absent = the one served.")
    input: Annotated[
        NonEmptyText | Annotated[list[InputMessage], Field(min_length=1, max_length=MAX_MESSAGES - 1)],
        _union("must be a string or a list of messages", _pick),
    ] = Field(description="A user message's text, or the conversation as messages; rendered with the chat "
                          "template, as /v1/chat/completions renders messages.")
    instructions: Text | None = Field(default=None, description="A system message before the input.")
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="Tokens to generate at most (default: the rest of the context); reaching it "
                                  "makes the response incomplete.")
    temperature: StrictFloat | None = _number(0, 2, description="0 = greedy. Default 1.")
    top_p: StrictFloat | None = _number(0, 1, lo_open=True, description="Nucleus sampling. Default 1.")
    stream: StrictBool | None = Field(default=None, description="Answer with typed server-sent events.")
    stream_options: ResponsesStreamOptions | None = Field(default=None, description="Only with stream: true.")
    text: TextConfig | None = Field(default=None, description="The output's format.")
    metadata: Annotated[dict[Annotated[StrictStr, Field(max_length=64)], Annotated[Text, Field(max_length=512)]],
                        Field(max_length=MAX_METADATA)] | None = Field(
        default=None, description="Returned in the response and recorded in the request log.")
    user: Annotated[Text, Field(max_length=256)] | None = Field(default=None, description="Recorded in the "
                                                                                           "request log.")
    safety_identifier: Annotated[Text, Field(max_length=256)] | None = Field(default=None,
                                                                             description="Recorded in the request log.")
    prompt_cache_key: Annotated[Text, Field(max_length=256)] | None = Field(default=None,
                                                                            description="Recorded in the request log.")
    service_tier: Literal["auto", "default"] | None = Field(default=None, description='Served as "default".')
    tools: list[dict[str, Any]] | None = Field(default=None, description="Tools are not supported: only [] is "
                                                                         "accepted.")
    tool_choice: Literal["none", "auto"] | None = Field(default=None, description='With no tools, "none" and '
                                                                                 '"auto" both mean plain text.')
    ignore_eos: StrictBool | None = Field(default=None, description="vLLM extension: keep generating after "
                                                                    "end-of-text (benchmarks).")
    stop: StopField = Field(default=None, description="vLLM extension: up to 4 strings that end the output, which "
                                                      "never contains them.")
    seed: Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)] | None = Field(
        default=None, description="vLLM extension: same seed, same request = same output.")
    # Known fields this server cannot honour: only the value that asks for nothing is accepted.
    store: OnlyFalse | None = Field(default=None, description=refused("store", "false"))
    previous_response_id: None = Field(default=None, description=refused("previous_response_id"))
    conversation: None = Field(default=None, description=refused("conversation"))
    background: OnlyFalse | None = Field(default=None, description=refused("background", "false"))
    background_options: None = Field(default=None, description=refused("background_options"))
    reasoning: None = Field(default=None, description=refused("reasoning"))
    include: None = Field(default=None, description=refused("include"))
    parallel_tool_calls: None = Field(default=None, description=refused("parallel_tool_calls"))
    max_tool_calls: None = Field(default=None, description=refused("max_tool_calls"))
    top_logprobs: OnlyZero | None = Field(default=None, description=refused("responses.top_logprobs", "0"))
    truncation: Literal["disabled"] | None = Field(default=None, description=refused("truncation", '"disabled"'))
    prompt: None = Field(default=None, description=refused("responses.prompt"))
    context_management: None = Field(default=None, description=refused("context_management"))
    image: None = Field(default=None, description=refused("image"))
    access_programs: None = Field(default=None, description=refused("access_programs"))
    moderation: None = Field(default=None, description=refused("moderation"))
    prompt_cache_retention: None = Field(default=None, description=refused("prompt_cache_retention"))
    prompt_cache_options: None = Field(default=None, description=refused("prompt_cache_options"))

    @model_validator(mode="after")
    def _rules(self) -> ResponsesRequest:
        if self.stream_options is not None and not self.stream:
            raise broken_rule("stream_options is only allowed with stream: true", "stream_options")
        if self.tools:
            raise broken_rule("tools are not supported (no function calling, no built-in tools): tools must be "
                              "empty", "tools", "unsupported_parameter")
        return self

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages: the instructions as a system message, then the input."""
        first = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        if isinstance(self.input, str):
            return [*first, {"role": "user", "content": self.input}]
        return [*first, *({"role": m.role, "content": m.text} for m in self.input)]

    def to_chat(self) -> ChatCompletionRequest:
        """The chat request this amounts to (validated as one: a rule of the chat route holds here too)."""
        fmt = self.text.format if self.text is not None else None
        response_format = None
        if isinstance(fmt, FormatJsonSchema):
            spec = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
            response_format = {"type": "json_schema", "json_schema": {k: v for k, v in spec.items() if v is not None}}
        elif fmt is not None:
            response_format = {"type": fmt.type}
        body = {"messages": self.messages(), "model": self.model, "max_completion_tokens": self.max_output_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "stream": self.stream,
                "response_format": response_format, "metadata": self.metadata, "user": self.user,
                "safety_identifier": self.safety_identifier, "prompt_cache_key": self.prompt_cache_key,
                "service_tier": self.service_tier, "ignore_eos": self.ignore_eos, "stop": self.stop,
                "seed": self.seed}
        return validate(ChatCompletionRequest, {k: v for k, v in body.items() if v is not None})
