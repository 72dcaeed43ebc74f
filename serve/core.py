"""The engine core: one ``step()`` = schedule -> prefill joiners -> decode the batch -> outputs.

Runs in the inference worker process (or in-process for benchmarks and tests). Each step
applies cancellations first, prefills newly admitted requests (their first token comes out of
the prefill), then advances every running row by one token in a single engine call, samples
each row with its own settings, turns tokens into text (holding back stop-string prefixes),
and finishes rows on end-of-text, a stop string or ``max_tokens`` so their slots free at once.

Convert: request dict (prompt ids + sampling settings) --> ``TokenEvent`` per request per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from nextoken.export.artifact import Artifact
from nextoken.serve.engine import Engine
from nextoken.serve.sampling import RowState, SamplingParams, sample
from nextoken.serve.scheduler import Scheduler, SeqInfo
from nextoken.serve.textstream import TextStream, TokenBytes


class ContextLengthError(ValueError):
    """The prompt plus ``max_tokens`` does not fit the model's context (a client error)."""


@dataclass
class TokenEvent:
    """What one request produced in one step (usually one token)."""

    rid: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    times: list[float] = field(default_factory=list)  # wall-clock time each token was sampled
    # per token: {"token", "token_id", "logprob", "bytes", "top": [[token, id, logprob, bytes], ...]}
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" once finished
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_time: float | None = None  # seconds from arrival to joining the batch (first event only)
    model: str | None = None  # the model version that served it (first and last events)

    def merge(self, later: TokenEvent) -> None:
        """Fold a later event of the same request into this one (to send fewer messages)."""
        self.token_ids += later.token_ids
        self.text += later.text
        self.times += later.times
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs
        self.finish_reason = later.finish_reason
        self.completion_tokens = later.completion_tokens
        if self.queue_time is None:
            self.queue_time = later.queue_time
        self.model = later.model or self.model

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in (None, [], "") or k in ("rid", "text")}


@dataclass
class StepStats:
    """Per-step figures for metrics: filled by the core, read by the metrics layer."""

    duration_s: float
    batch_size: int
    running: int
    waiting: int
    slots_in_use: int
    slots_total: int


class _Active:
    __slots__ = ("seq", "params", "row", "text", "last_token", "prompt_ids", "first_sent")

    def __init__(self, seq: SeqInfo, params: SamplingParams, row: RowState, text: TextStream,
                 prompt_ids: list[int]) -> None:
        self.seq, self.params, self.row, self.text = seq, params, row, text
        self.prompt_ids = prompt_ids
        self.last_token = -1
        self.first_sent = False


class GenerationCore:
    def __init__(self, artifact: Artifact, *, max_batch_size: int = 32, device: str = "cpu", threads: int = 0,
                 on_step: Callable[[StepStats], None] | None = None) -> None:
        self.artifact = artifact
        self.engine = Engine(artifact, device=device, threads=threads)
        self.tokenizer = Tokenizer.from_file(str(artifact.tokenizer_path))
        self.eos_id = int(artifact.config["eos_token_id"])
        self.context = self.engine.context
        self.scheduler = Scheduler(max_batch_size)
        self.active: dict[str, _Active] = {}
        self.on_step = on_step
        self._vocab_text: dict[int, str] = {}
        self._token_bytes = TokenBytes(self.tokenizer)

    # --- requests ----------------------------------------------------------------------------
    def add(self, rid: str, prompt_ids: list[int], params: SamplingParams, arrival: float | None = None) -> None:
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if len(prompt_ids) + params.max_tokens > self.context:
            raise ContextLengthError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                                     f"the context of {self.context} tokens")
        seq = SeqInfo(rid, len(prompt_ids), params.max_tokens, arrival if arrival is not None else time.time())
        row = RowState(params, self.engine.vocab_size, prompt_ids)
        self.active[rid] = _Active(seq, params, row, TextStream(self.tokenizer, params.stop), list(prompt_ids))
        self.scheduler.add(seq)

    def cancel(self, rid: str) -> None:
        self.scheduler.cancel(rid)

    def abort_all(self) -> list[str]:
        """Drop every running and waiting request (after a failed step); returns their ids.

        The engine's batch may be half-updated after an exception, so it is emptied whole rather
        than trusted; the core is then as good as new for the next request.
        """
        rids = list(self.active)
        self.engine.release(list(self.engine.rids))
        self.scheduler = Scheduler(self.scheduler.max_running)
        self.active.clear()
        return rids

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def has_capacity(self) -> bool:
        return self.scheduler.has_capacity()

    # --- the step ----------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        events: list[TokenEvent] = []
        if sched.cancelled:
            self.engine.release([s.rid for s in sched.cancelled])
            for s in sched.cancelled:
                a = self.active.pop(s.rid)
                events.append(TokenEvent(s.rid, finish_reason="cancelled", prompt_tokens=s.num_prompt_tokens,
                                         completion_tokens=a.seq.num_generated, model=self.artifact.model_id))
        finished: list[str] = []
        batch = 0
        if sched.prefill:
            rids = [s.rid for s in sched.prefill]
            logits = self.engine.prefill(rids, [self.active[r].prompt_ids for r in rids])  # (n, V)
            self._sample_and_emit(rids, logits, events, finished)
            batch += len(rids)
        if finished:
            self.engine.release(finished)
            finished = []
        if self.engine.batch_size:
            rids = list(self.engine.rids)
            tokens = np.fromiter((self.active[r].last_token for r in rids), dtype=np.int64, count=len(rids))
            logits = self.engine.decode(tokens)  # (B, V)
            self._sample_and_emit(rids, logits, events, finished)
            batch = max(batch, len(rids))
            if finished:
                self.engine.release(finished)
        if self.on_step is not None:
            self.on_step(StepStats(time.perf_counter() - t0, batch, len(self.scheduler.running),
                                   len(self.scheduler.waiting), len(self.scheduler.running),
                                   self.scheduler.max_running))
        return events

    def _token_text(self, token_id: int) -> str:
        t = self._vocab_text.get(token_id)
        if t is None:
            t = self._vocab_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return t

    def _sample_and_emit(self, rids: list[str], logits: np.ndarray, events: list[TokenEvent],
                         finished: list[str]) -> None:
        actives = [self.active[r] for r in rids]
        res = sample(logits, [a.row for a in actives])
        now = time.time()
        for b, a in enumerate(actives):
            tok = int(res.token_ids[b])
            a.last_token = tok
            a.seq.num_generated += 1
            ev = TokenEvent(a.seq.rid, [tok], times=[now], prompt_tokens=a.seq.num_prompt_tokens,
                            completion_tokens=a.seq.num_generated)
            if not a.first_sent:
                ev.queue_time = (a.seq.admitted or now) - a.seq.arrival
                ev.model = self.artifact.model_id
                a.first_sent = True
            if a.params.logprobs is not None:
                top = [] if res.top_ids[b] is None else [
                    [self._token_text(int(i)), int(i), float(lp), list(self._token_bytes(int(i)))]
                    for i, lp in zip(res.top_ids[b], res.top_logprobs[b], strict=True)]
                ev.logprobs = [{"token": self._token_text(tok), "token_id": tok, "logprob": float(res.logprobs[b]),
                                "bytes": list(self._token_bytes(tok)), "top": top}]
            if tok == self.eos_id and not a.params.ignore_eos:
                ev.finish_reason = "stop"
            else:
                delta = a.text.push(tok)
                ev.text = delta.text
                if delta.stopped:
                    ev.finish_reason = "stop"
                elif a.seq.num_generated >= a.params.max_tokens:
                    ev.finish_reason = "length"
            if ev.finish_reason is not None:
                ev.model = self.artifact.model_id
                if ev.finish_reason != "stop" or tok == self.eos_id:
                    ev.text += a.text.finish()  # release a held-back tail that never became a stop string
                finished.append(a.seq.rid)
                self.scheduler.finish(a.seq.rid)
                del self.active[a.seq.rid]
            events.append(ev)
