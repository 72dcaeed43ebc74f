"""The response models: every body the server answers with, and every streamed chunk.

Responses are closed (``additionalProperties: false``), so a client generated from ``/openapi.json``
sees every field the server sends. The builder (``builder.py``) makes bodies and chunks from these
models (``model_construct``: no validation on the hot path) and serialises what it set; a test
validates what the real server sends against them.

This module knows nothing about requests, tokenizers or the engine.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from nextoken.serve.http.fields import _Closed

ACCEPTED_DRAFT = ("nextoken extension, with --speculative: for each token in token_ids, whether it was a draft token "
                  "the model accepted; present once the choice has had one.")


class ErrorBody(_Closed):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Closed):
    """Every 4xx and 5xx answer."""

    error: ErrorBody


class PromptTokensDetails(_Closed):
    cached_tokens: int = Field(description="Of prompt_tokens, those whose KV came from the prefix cache "
                                           "(nextoken_prefix_cache_hits_total counts the same tokens).")
    cache_write_tokens: int = Field(description="Of prompt_tokens, those whose KV this request wrote into the "
                                                "prefix cache (whole blocks it did not hold yet).")


class Usage(_Closed):
    prompt_tokens: int = Field(description="Each prompt's tokens, counted once per prompt (not per choice).")
    completion_tokens: int = Field(description="Generated tokens, all choices together.")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


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
    accepted_draft: list[bool] | None = Field(default=None, description=ACCEPTED_DRAFT)
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
    accepted_draft: list[bool] | None = Field(default=None, description=ACCEPTED_DRAFT)


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
    accepted_draft: list[bool] | None = Field(default=None, description=ACCEPTED_DRAFT)


class ChatCompletionChunk(_Closed):
    """One server-sent event of a streamed chat completion (``data: {...}``)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    service_tier: Literal["default"] | None = None


class CompletionChunk(CompletionResponse):
    """One server-sent event of a streamed completion (``data: {...}``); the stream ends with ``data: [DONE]``.

    OpenAI's completions stream carries the body's own shape, one choice's new text at a time."""


class ModelCard(_Closed):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    name: str
    version: str
    context_length: int
    max_model_len: int
    chat_template: Literal["model", "--chat-template", "nextoken default"]  # which template chats are rendered with
    default_sampling_params: dict[str, int | float]  # generation_config.json's, for fields a request omits


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


class ApplyTemplateResponse(_Closed):
    prompt: str  # the rendered chat, special tokens written as text


class TokenizerInfoResponse(BaseModel):
    """vLLM's /tokenizer_info: the tokenizer_config.json a Hugging Face tokenizer would load, plus what the
    server adds (vocab_size, the chat template lm-eval renders)."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str
    eos_token: str
    bos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
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


# --- the Responses API (POST /v1/responses) ------------------------------------------------------
class InputTokensDetails(_Closed):
    cached_tokens: int = Field(description="Of input_tokens, those the prefix cache served.")
    cache_write_tokens: int = Field(description="Of input_tokens, those written into the prefix cache.")


class OutputTokensDetails(_Closed):
    reasoning_tokens: int = Field(description="Always 0: this is not a reasoning model.")


class ResponsesUsage(_Closed):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class OutputTextPart(_Closed):
    type: Literal["output_text"]
    text: str
    annotations: list[dict] = Field(description="Always empty (no citations).")
    logprobs: list[dict] = Field(description="Always empty (logprobs are not supported here).")


class OutputMessage(_Closed):
    type: Literal["message"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputTextPart]


class IncompleteDetails(_Closed):
    reason: Literal["max_output_tokens"]


class ResponseObject(_Closed):
    """A response: its one output message, the settings it ran with, usage once it is done."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"] = Field(
        description="incomplete: the output reached max_output_tokens (or the context's end).")
    error: None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputMessage]
    parallel_tool_calls: bool
    previous_response_id: None
    reasoning: None
    store: bool
    temperature: float | None
    text: dict = Field(description='The text format it answered in, as asked ({"format": {"type": "text"}}).')
    tool_choice: Literal["none", "auto"]
    tools: list[dict]
    top_p: float | None
    truncation: Literal["disabled"]
    usage: ResponsesUsage | None
    metadata: dict[str, str] | None
    service_tier: Literal["default"] | None = None
    user: str | None = None


class ResponseStateEvent(_Closed):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete"]
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(_Closed):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputMessage


class ContentPartEvent(_Closed):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputTextPart


class TextDeltaEvent(_Closed):
    type: Literal["response.output_text.delta"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[dict]


class TextDoneEvent(_Closed):
    type: Literal["response.output_text.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[dict]


class ErrorEvent(_Closed):
    """Generation failed after the stream began: the last event."""

    type: Literal["error"]
    sequence_number: int
    code: str | None
    message: str
    param: str | None


class ResponseStreamEvent(RootModel):
    """One server-sent event of a streamed response (``event: <type>``, ``data: {...}``), in this order:
    response.created, response.in_progress, response.output_item.added, response.content_part.added,
    response.output_text.delta (each piece of text), response.output_text.done, response.content_part.done,
    response.output_item.done, then response.completed or response.incomplete (or error)."""

    root: Annotated[ResponseStateEvent | OutputItemEvent | ContentPartEvent | TextDeltaEvent | TextDoneEvent
                    | ErrorEvent, Field(discriminator="type")]
