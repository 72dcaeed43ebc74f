"""The Responses API's answers: one ``ResponseObject``, or its typed event stream, from the chat request's choice.

A response has one output message with one ``output_text`` part. Streamed, it is OpenAI's event
sequence, each event ``event: <type>`` + ``data: {...}`` with a ``sequence_number``:
``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, a ``response.output_text.delta`` per piece of text,
``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``, and
``response.completed`` (or ``response.incomplete`` when ``max_output_tokens`` ended it), carrying the
whole response with its usage; an ``error`` event if generation fails midway. No ``[DONE]``: the
Responses stream ends with its last event. Usage is the Responses API's shape (``input_tokens``,
``input_tokens_details`` with ``cached_tokens`` and ``cache_write_tokens``, ``output_tokens``).

It has the same methods as ``builder.ResponseBuilder``, so the frontend streams and answers both alike.
This module knows nothing about tokenizers, routes or the engine.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel

from nextoken.serve.http import responses as R
from nextoken.serve.http.builder import ChoiceState, LogprobEntry, PromptTokens
from nextoken.serve.http.responses_api import ResponsesRequest, responses_param


def _event(obj: BaseModel) -> bytes:
    data = obj.model_dump_json(exclude_unset=True)
    return f"event: {obj.type}\ndata: ".encode() + data.encode() + b"\n\n"  # type: ignore[attr-defined]


class ResponsesBuilder:
    """The body, or the event stream, of one response."""

    endpoint = "responses"

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.req = req
        self.model = model
        self.id = "resp_" + uuid.uuid4().hex
        self.item_id = "msg_" + uuid.uuid4().hex
        self.created_at = int(time.time())
        self.seq = 0  # sequence_number of the next event

    def _next(self) -> int:
        self.seq += 1
        return self.seq - 1

    def _text_config(self) -> dict[str, Any]:
        fmt = self.req.text.format if self.req.text is not None else None
        return {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt is not None else {"type": "text"}}

    def _message(self, text: str | None, status: str) -> R.OutputMessage:
        parts = [] if text is None else [self._part(text)]
        return R.OutputMessage.model_construct(type="message", id=self.item_id, status=status, role="assistant",
                                               content=parts)

    @staticmethod
    def _part(text: str) -> R.OutputTextPart:
        return R.OutputTextPart.model_construct(type="output_text", text=text, annotations=[], logprobs=[])

    def response(self, status: str, output: list[R.OutputMessage],
                 usage: R.ResponsesUsage | None = None) -> R.ResponseObject:
        q = self.req
        extra = {"service_tier": "default"} if q.service_tier is not None else {}
        if q.user is not None:
            extra["user"] = q.user
        incomplete = R.IncompleteDetails.model_construct(reason="max_output_tokens") if status == "incomplete" else None
        return R.ResponseObject.model_construct(
            id=self.id, object="response", created_at=self.created_at, status=status, error=None,
            incomplete_details=incomplete, instructions=q.instructions, max_output_tokens=q.max_output_tokens,
            model=self.model, output=output, parallel_tool_calls=False, previous_response_id=None, reasoning=None,
            store=False, temperature=q.temperature, text=self._text_config(), tool_choice=q.tool_choice or "none",
            tools=[], top_p=q.top_p, truncation="disabled", usage=usage, metadata=q.metadata, **extra)

    @staticmethod
    def usage(states: list[ChoiceState], prompt: PromptTokens) -> R.ResponsesUsage:
        out = sum(st.completion_tokens for st in states)
        return R.ResponsesUsage.model_construct(
            input_tokens=prompt.count, input_tokens_details=R.InputTokensDetails.model_construct(
                cached_tokens=prompt.cached, cache_write_tokens=prompt.written),
            output_tokens=out, output_tokens_details=R.OutputTokensDetails.model_construct(reasoning_tokens=0),
            total_tokens=prompt.count + out)

    @staticmethod
    def _status(states: list[ChoiceState]) -> str:
        return "incomplete" if any(st.finish_reason == "length" for st in states) else "completed"

    def final(self, states: list[ChoiceState], prompt: PromptTokens) -> R.ResponseObject:
        status = self._status(states)
        text = "".join(t for st in states for t in st.text)
        return self.response(status, [self._message(text, status)], self.usage(states, prompt))

    # --- streaming ------------------------------------------------------------------------------
    def stream_start(self) -> bytes:
        def state(kind: str) -> bytes:
            return _event(R.ResponseStateEvent.model_construct(type=kind, sequence_number=self._next(),
                                                               response=self.response("in_progress", [])))

        return b"".join([
            state("response.created"), state("response.in_progress"),
            _event(R.OutputItemEvent.model_construct(type="response.output_item.added", sequence_number=self._next(),
                                                     output_index=0, item=self._message(None, "in_progress"))),
            _event(R.ContentPartEvent.model_construct(type="response.content_part.added",
                                                      sequence_number=self._next(), item_id=self.item_id,
                                                      output_index=0, content_index=0, part=self._part(""))),
        ])

    def stream_event(self, st: ChoiceState, text: str, token_ids: list[int], logprobs: list[LogprobEntry] | None,
                     finish_reason: str | None, usage: Any = None) -> bytes:
        st.started = True
        if not text:
            return b""
        return _event(R.TextDeltaEvent.model_construct(type="response.output_text.delta", sequence_number=self._next(),
                                                       item_id=self.item_id, output_index=0, content_index=0,
                                                       delta=text, logprobs=[]))

    def stream_end(self, states: list[ChoiceState], prompt: PromptTokens) -> bytes:
        status = self._status(states)
        text = "".join(t for st in states for t in st.text)
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        done = self._message(text, status)
        final = self.response(status, [done], self.usage(states, prompt))
        return b"".join([
            _event(R.TextDoneEvent.model_construct(type="response.output_text.done", sequence_number=self._next(),
                                                   text=text, logprobs=[], **where)),
            _event(R.ContentPartEvent.model_construct(type="response.content_part.done", sequence_number=self._next(),
                                                      part=self._part(text), **where)),
            _event(R.OutputItemEvent.model_construct(type="response.output_item.done", sequence_number=self._next(),
                                                     output_index=0, item=done)),
            _event(R.ResponseStateEvent.model_construct(type=f"response.{status}", sequence_number=self._next(),
                                                        response=final)),
        ])

    def stream_error(self, body: dict) -> bytes:
        err = body["error"]
        event = {"type": "error", "sequence_number": self._next(), "code": err.get("code"),
                 "message": err["message"], "param": responses_param(err.get("param"))}
        return b"event: error\ndata: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
