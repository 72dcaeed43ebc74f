"""Answers: the chunks and bodies of one response over all its choices, made from the response models.

``ResponseBuilder`` turns each choice's events (text, token ids, ``LogprobEntry``s, a finish reason)
into OpenAI's shapes: a ``CompletionChunk`` / ``ChatCompletionChunk`` per event when streaming, one
``CompletionResponse`` / ``ChatCompletionResponse`` otherwise, every chunk sharing one id. Models are
made with ``model_construct`` (the values are ours, already right) and sent with only the fields set.

Logprobs come in two shapes: completions' legacy lists (``tokens``, ``token_logprobs``,
``top_logprobs`` as token -> logprob, ``text_offset``) and chat's ``content`` entries with ``bytes``
(a byte-level BPE token can be part of a character; its bytes let a client put it back together).

This module knows nothing about tokenizers, routes or the engine.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel
from starlette.responses import Response

from nextoken.serve.http import responses as R
from nextoken.serve.http.plan import Choice


@dataclass(frozen=True)
class Candidate:
    """A token as a client sees it: its text, id, log-probability and bytes."""

    token: str
    token_id: int
    logprob: float
    bytes: list[int]


@dataclass(frozen=True)
class LogprobEntry(Candidate):
    """A generated (or echoed) token with the most likely alternatives at its position."""

    top: list[Candidate] = field(default_factory=list)


@dataclass
class ChoiceState:
    """What one choice has produced so far (non-streaming answers keep all of it)."""

    choice: Choice
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] | None = None
    prompt_logprobs: list[LogprobEntry | None] | None = None  # None entry: a token with nothing before it
    finish_reason: str | None = None
    drafted: list[bool] | None = None  # per token in token_ids: an accepted draft token (None: none was yet)
    completion_tokens: int = 0
    text_offset: int = 0  # streaming: characters sent so far (completions' text_offset)
    started: bool = False  # streaming: the first chunk (role, echo) is out


@dataclass(frozen=True)
class PromptTokens:
    """A request's prompt tokens (each prompt once), and of those, what the prefix cache served and took in."""

    count: int
    cached: int = 0  # served from the prefix cache
    written: int = 0  # newly written into the prefix cache


def usage(prompt: PromptTokens, completion_tokens: int) -> R.Usage:
    """OpenAI's usage; ``prompt_tokens_details`` is always sent (vLLM's --enable-prompt-tokens-details, which
    costs nothing here)."""
    return R.Usage.model_construct(prompt_tokens=prompt.count, completion_tokens=completion_tokens,
                                   total_tokens=prompt.count + completion_tokens,
                                   prompt_tokens_details=R.PromptTokensDetails.model_construct(
                                       cached_tokens=prompt.cached, cache_write_tokens=prompt.written))


def completion_logprobs(items: list[LogprobEntry | None], offset: int,
                        tokens: list[str] | None = None) -> R.CompletionLogprobs:
    """OpenAI's legacy shape; an item of None (a token with nothing before it) has null logprobs."""
    out_tokens, lps, tops, offsets = [], [], [], []
    for i, it in enumerate(items):
        token = tokens[i] if tokens is not None else it.token
        out_tokens.append(token)
        lps.append(None if it is None else it.logprob)
        tops.append({t.token: t.logprob for t in it.top} if it is not None and it.top else None)
        offsets.append(offset)
        offset += len(token)
    return R.CompletionLogprobs.model_construct(tokens=out_tokens, token_logprobs=lps, top_logprobs=tops,
                                                text_offset=offsets)


def _joined(a: R.CompletionLogprobs, b: R.CompletionLogprobs) -> R.CompletionLogprobs:
    return R.CompletionLogprobs.model_construct(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs
                                                + b.token_logprobs, top_logprobs=a.top_logprobs + b.top_logprobs,
                                                text_offset=a.text_offset + b.text_offset)


def chat_logprobs(items: list[LogprobEntry]) -> R.ChatLogprobs:
    return R.ChatLogprobs.model_construct(content=[R.TokenLogprob.model_construct(
        token=it.token, logprob=it.logprob, bytes=it.bytes,
        top_logprobs=[R.TopLogprob.model_construct(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in it.top])
        for it in items])


def sse(obj: BaseModel | dict) -> bytes:
    """One server-sent event: a response model with only the fields it was given, or a plain dict."""
    if isinstance(obj, BaseModel):
        return b"data: " + obj.model_dump_json(exclude_unset=True).encode() + b"\n\n"
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def answer(body: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response of one response model, with the fields it was given."""
    return Response(body.model_dump_json(exclude_unset=True), status_code=status, headers=headers,
                    media_type="application/json")


def _drafted(st: ChoiceState, last: int | None = None) -> dict:
    """``accepted_draft`` for the choice's tokens (its ``last`` ones in a chunk), once it has had one."""
    if st.drafted is None or last == 0:
        return {}
    return {"accepted_draft": st.drafted if last is None else st.drafted[-last:]}


class ResponseBuilder:
    """Chunks and final bodies for one response over all its choices; every chunk shares one id."""

    def __init__(self, endpoint: str, model: str, *, echo: bool = False, logprobs: bool = False,
                 service_tier: str | None = None, token_text: Callable[[int], str] | None = None,
                 request_id: str | None = None, include_usage: bool = False) -> None:
        self.endpoint = endpoint
        self.model = model
        self.id = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + (request_id or uuid.uuid4().hex)
        self.include_usage = include_usage  # streaming: a last chunk with the whole request's usage
        self.created = int(time.time())
        self.echo = echo
        self.want_logprobs = logprobs
        self.service_tier = "default" if service_tier is not None else None
        self.token_text = token_text  # id -> token string, for echoed tokens the engine gave no entry

    def _head(self) -> dict:
        head = {"id": self.id, "created": self.created, "model": self.model}
        if self.endpoint == "chat" and self.service_tier is not None:
            head["service_tier"] = self.service_tier
        return head

    def _echo_logprobs(self, st: ChoiceState) -> R.CompletionLogprobs:
        """The prompt part of completions logprobs: one entry per echoed token (None before any context)."""
        c = st.choice
        if st.prompt_logprobs is None:
            raise RuntimeError("the engine returned no prompt logprobs for an echo request")
        skip = len(c.prompt_ids) - len(c.echo_ids)  # the implicit <|endoftext|> is fed, not echoed
        items = list(st.prompt_logprobs[skip:skip + len(c.echo_ids)])
        tokens = [it.token if it is not None else self.token_text(t) for it, t in zip(items, c.echo_ids, strict=True)]
        return completion_logprobs(items, 0, tokens)

    def _completion_logprobs(self, st: ChoiceState, items: list[LogprobEntry], first: bool
                             ) -> R.CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        echoed = first and self.echo
        gen = completion_logprobs(items, st.text_offset + (len(st.choice.echo_text) if echoed else 0))
        return _joined(self._echo_logprobs(st), gen) if echoed else gen

    # --- streaming: the SSE frames, from the first to [DONE] -----------------------------------
    def stream_start(self) -> bytes:
        return b""  # OpenAI's chunks need no opening event

    def stream_event(self, st: ChoiceState, text: str, token_ids: list[int], logprobs: list[LogprobEntry] | None,
                     finish_reason: str | None, usage: R.Usage | None = None) -> bytes:
        """One choice's event as a chunk, when it has something to say; ``usage``: continuous_usage_stats."""
        if not (token_ids or finish_reason or not st.started or text):
            return b""
        return sse(self.chunk(st, text, token_ids, logprobs, finish_reason, usage))

    def stream_end(self, states: list[ChoiceState], prompt: PromptTokens) -> bytes:
        completion = sum(st.completion_tokens for st in states)
        tail = sse(self.usage_chunk(prompt, completion)) if self.include_usage else b""
        return tail + SSE_DONE

    def stream_error(self, body: dict) -> bytes:
        return sse(body)  # the error body as the last event, without [DONE]

    def chunk(self, st: ChoiceState, text: str, token_ids: list[int], logprobs: list[LogprobEntry] | None,
              finish_reason: str | None, usage: R.Usage | None = None) -> R.CompletionChunk | R.ChatCompletionChunk:
        """One streamed event of one choice; call with every event in order (it tracks offsets)."""
        first = not st.started
        st.started = True
        c = st.choice
        extra_usage = {"usage": usage} if usage is not None else {}
        if self.endpoint == "chat":
            delta = (R.ChatDelta.model_construct(role="assistant", content=text) if first else
                     R.ChatDelta.model_construct(content=text) if text or finish_reason is None else
                     R.ChatDelta.model_construct())
            choice = R.ChatChunkChoice.model_construct(index=c.index, delta=delta, logprobs=chat_logprobs(logprobs)
                                                       if logprobs else None, finish_reason=finish_reason,
                                                       token_ids=token_ids, **_drafted(st, len(token_ids)))
            return R.ChatCompletionChunk.model_construct(**self._head(), object="chat.completion.chunk",
                                                         choices=[choice], **extra_usage)
        lp = self._completion_logprobs(st, logprobs or [], first) if (logprobs or (first and self.echo)) else None
        if lp is not None and not lp.tokens:
            lp = None
        shown = (c.echo_text if first and self.echo else "") + text
        st.text_offset += len(shown)
        extra = {"prompt_token_ids": c.echo_ids} if first and self.echo else {}
        extra.update(_drafted(st, len(token_ids)))
        choice = R.CompletionChoice.model_construct(index=c.index, text=shown, logprobs=lp,
                                                    finish_reason=finish_reason, token_ids=token_ids, **extra)
        return R.CompletionChunk.model_construct(**self._head(), object="text_completion", choices=[choice],
                                                 **extra_usage)

    def usage_chunk(self, prompt: PromptTokens, completion_tokens: int) -> R.CompletionChunk | R.ChatCompletionChunk:
        chunk = R.ChatCompletionChunk if self.endpoint == "chat" else R.CompletionChunk
        obj = "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"
        return chunk.model_construct(**self._head(), object=obj, choices=[],
                                     usage=usage(prompt, completion_tokens))

    def final(self, states: list[ChoiceState], prompt: PromptTokens) -> R.CompletionResponse | R.ChatCompletionResponse:
        """The whole answer: every choice in index order, usage over all of them."""
        used = usage(prompt, sum(st.completion_tokens for st in states))
        ordered = sorted(states, key=lambda s: s.choice.index)
        if self.endpoint == "chat":
            choices = [R.ChatChoice.model_construct(
                index=st.choice.index, message=R.AssistantMessage.model_construct(role="assistant",
                                                                                  content="".join(st.text)),
                logprobs=chat_logprobs(st.logprobs) if st.logprobs is not None else None,
                finish_reason=st.finish_reason, token_ids=st.token_ids, **_drafted(st)) for st in ordered]
            return R.ChatCompletionResponse.model_construct(**self._head(), object="chat.completion", choices=choices,
                                                            usage=used)
        out = []
        for st in ordered:
            lp = None
            if self.want_logprobs:
                lp = completion_logprobs(st.logprobs or [], len(st.choice.echo_text) if self.echo else 0)
                if self.echo:
                    lp = _joined(self._echo_logprobs(st), lp)
            extra = {"prompt_token_ids": st.choice.echo_ids} if self.echo else {}
            extra.update(_drafted(st))
            out.append(R.CompletionChoice.model_construct(
                index=st.choice.index, text=(st.choice.echo_text if self.echo else "") + "".join(st.text),
                logprobs=lp, finish_reason=st.finish_reason, token_ids=st.token_ids, **extra))
        return R.CompletionResponse.model_construct(**self._head(), object="text_completion", choices=out, usage=used)
