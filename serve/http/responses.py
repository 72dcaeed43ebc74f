"""The response models: every body the server answers with, and every streamed chunk.

Responses are closed (``additionalProperties: false``), so a client generated from ``/openapi.json``
sees every field the server sends. The builder (``builder.py``) makes bodies and chunks from these
models (``model_construct``: no validation on the hot path) and serialises what it set; a test
validates what the real server sends against them.

This module knows nothing about requests, tokenizers or the engine.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from nextoken.serve.http.fields import _Closed


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
