"""A request's choices in flight: each choice's engine stream turned into text events, and all of them together.

``ChoiceRun`` folds a choice's engine updates into ``Event``s: text through the text stream (stop strings
never emitted, never split), token ids, ``LogprobEntry``s, the finish reason; a stop string cancels the
choice in the engine at once. ``Fanout`` waits on every open choice of one HTTP request, frees each
choice's admission place as it ends, and cancels the rest when the client leaves or a choice fails.
It knows nothing about HTTP responses' shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

from nextoken.serve.http.builder import ChoiceState, LogprobEntry, PromptTokens
from nextoken.serve.http.engine_client import RequestStream, Update
from nextoken.serve.http.errors import RequestError
from nextoken.serve.http.served_model import ServedModel
from nextoken.serve.http.textstream import TextStream
from nextoken.serve.wire import FinishReason

if TYPE_CHECKING:
    from nextoken.serve.http.frontend import Frontend


@dataclass
class Event:
    """What one choice has to say now: new text and tokens, their logprob entries, maybe its end."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] | None = None
    finish_reason: str | None = None  # a FinishReason's value


class ChoiceRun:
    """One choice in flight: its engine stream turned into text, with stop strings and logprob entries."""

    def __init__(self, frontend: Frontend, state: ChoiceState, stream: RequestStream | None, model: ServedModel,
                 endpoint: str, arrival: float) -> None:
        self.frontend = frontend
        self.state = state
        self.stream = stream
        self.model = model  # the version running it (updated from the engine's Started message)
        self.endpoint = endpoint
        self.arrival = arrival
        params = state.choice.params
        self.min_tokens = params.min_tokens if params is not None else 0
        self.text = self._text_stream(model, state.choice.prompt_ids)
        self.want_logprobs = params is not None and params.logprobs is not None
        self.times: list[float] = []
        self.queue_time: float | None = None
        self.prompt_tokens = len(state.choice.prompt_ids)
        self.cached_tokens = 0  # of prompt_tokens, served from the prefix cache (the engine's Started says)
        self.written_tokens = 0  # of prompt_tokens, written into the prefix cache
        self.stopped = False  # a stop string ended it here (the engine was told to cancel)
        self.done = stream is None

    def _text_stream(self, model: ServedModel, context: list[int] | None) -> TextStream:
        """Decodes after ``context`` (the prompt's ids, when this model tokenized them)."""
        p = self.state.choice.params
        if p is None:
            return TextStream(model.tokenizer, [], context)
        return TextStream(model.tokenizer, p.stop, context, include=p.include_stop,
                          special=None if p.skip_special_tokens else model.special_texts,
                          spaces=p.spaces_between_special_tokens)

    def _start(self, u: Update) -> None:
        st = u.started
        self.queue_time = max(0.0, st.queue_time)
        self.prompt_tokens = st.prompt_tokens
        self.cached_tokens = st.cached_tokens
        self.written_tokens = st.written_tokens
        if st.model != self.model.id:  # another version ran it (hot reload): its tokenizer decodes
            self.model = self.frontend.model_for(st.model)
            self.text = self._text_stream(self.model, None)  # its prompt ids were not ours
        if st.prompt_logprobs is not None:
            ids = self.state.choice.prompt_ids
            entries: list[LogprobEntry | None] = [None]  # the first prompt token has nothing before it
            for i in range(len(st.prompt_logprobs)):
                entries.append(self.model.logprob_entry(int(ids[i + 1]), float(st.prompt_logprobs[i]),
                                                        st.prompt_top_ids[i], st.prompt_top_logprobs[i]))
            self.state.prompt_logprobs = entries

    def apply(self, u: Update) -> Event:
        """Fold an engine update into the choice; returns what to send (empty when nothing is new)."""
        ev = Event()
        if u.failed is not None:
            raise RequestError(u.failed.message, param=u.failed.param, code=u.failed.code, status=u.failed.status)
        if u.started is not None:
            self._start(u)
        if self.stopped:
            return ev  # tokens that were already on their way when the stop string was seen
        st = self.state
        eos = self.model.eos_ids
        params = st.choice.params
        if u.drafted is not None and st.drafted is None:
            st.drafted = [False] * len(st.token_ids)
        for k, tok in enumerate(u.token_ids):
            st.token_ids.append(tok)
            if st.drafted is not None:
                st.drafted.append(u.drafted is not None and u.drafted[k])
            ev.token_ids.append(tok)
            self.times.append(u.times[k])
            st.completion_tokens += 1
            if self.want_logprobs and u.logprobs is not None:
                entry = self.model.logprob_entry(tok, u.logprobs[k], u.top_ids[k] if u.top_ids else None,
                                                 u.top_logprobs[k] if u.top_logprobs else None)
                ev.logprobs = (ev.logprobs or []) + [entry]
            if tok in eos and not params.ignore_eos:
                continue  # end-of-text ends it (the engine's Finished follows) and has no text
            # vLLM: no stop string counts before min_tokens tokens
            delta = self.text.push(tok, check_stops=st.completion_tokens > self.min_tokens)
            ev.text += delta.text
            if delta.stopped:
                self.stopped = True
                ev.finish_reason = FinishReason.STOP.value
                self.stream.cancel()
                break
        if ev.finish_reason is None and u.finished is not None:
            ev.finish_reason = str(u.finished.reason)  # plain text from here on
            if ev.finish_reason != FinishReason.CANCELLED:
                ev.text += self.text.finish()  # a held-back tail that can no longer become a stop string
        if ev.finish_reason is not None:
            st.finish_reason = ev.finish_reason
            self.done = True
            if self.stream is not None:
                self.stream.close()
        st.text.append(ev.text)
        if ev.logprobs is not None:
            st.logprobs = (st.logprobs or []) + ev.logprobs
        elif self.want_logprobs and st.logprobs is None:
            st.logprobs = []
        return ev

    def record(self, outcome: str) -> None:
        m = self.frontend.metrics
        if m is None or self.stream is None:
            return
        m.observe_request(self.model.id, self.endpoint, outcome, arrival=self.arrival,
                          first_token=self.times[0] if self.times else None, token_times=self.times,
                          prompt_tokens=self.prompt_tokens, generated_tokens=self.state.completion_tokens,
                          queue_time_s=self.queue_time)


class Fanout:
    """One HTTP request's choices: their updates as they come, each choice's admission freed when it ends."""

    def __init__(self, frontend: Frontend, runs: list[ChoiceRun], admitted: int) -> None:
        self.frontend = frontend
        self.runs = runs
        self.open = [r for r in runs if not r.done]
        self.admitted = admitted

    async def next(self) -> list[tuple[ChoiceRun, Event]]:
        """The next events of whichever choices have something (at least one)."""
        if len(self.open) == 1:
            run = self.open[0]
            out = [(run, run.apply(await run.stream.next()))]
        else:
            waits = {asyncio.ensure_future(r.stream.next()): r for r in self.open}
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for f in waits:
                    if not f.done():
                        f.cancel()
            out = [(waits[f], waits[f].apply(f.result())) for f in done]
        for run, _ in out:
            if run.done:
                self._finished(run, run.state.finish_reason)
        return out

    def finish_reason(self) -> str:
        """The request's outcome as the metrics name it (stop, length...): its choices' reasons, joined."""
        return ",".join(sorted({r.state.finish_reason for r in self.runs}))

    def _finished(self, run: ChoiceRun, outcome: str) -> None:
        if run in self.open:
            self.open.remove(run)
            self.frontend.state.release(1)
            self.admitted -= 1
            run.record(outcome)

    def close(self, outcome: str) -> None:
        """Cancel every choice still running (the client left, or the request failed) and free their places."""
        for run in list(self.open):
            run.stream.cancel()
            self._finished(run, outcome)

    def prompt_tokens(self) -> int:
        """Each prompt's tokens once (not once per choice), as the engine last reported them."""
        per_prompt = {r.state.choice.prompt_index: r.prompt_tokens for r in self.runs}
        return sum(per_prompt.values())

    def prompt(self) -> PromptTokens:
        """``prompt_tokens()`` with what the prefix cache served and took in: per prompt, the same choice's."""
        per_prompt = {r.state.choice.prompt_index: r for r in self.runs}
        return PromptTokens(sum(r.prompt_tokens for r in per_prompt.values()),
                            sum(r.cached_tokens for r in per_prompt.values()),
                            sum(r.written_tokens for r in per_prompt.values()))

    def completion_tokens(self) -> int:
        return sum(r.state.completion_tokens for r in self.runs)


async def or_disconnect(work: Any, request: Request) -> Any | None:
    """``await work``, or None when the client disconnects first (its body is read, so a disconnect is
    the next message on the ASGI channel)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return None


async def disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)
