"""The engine core: one ``step()`` = schedule -> copy cached prefixes -> prefill chunks -> decode -> sample.

Runs in the engine process (or in-process for benchmarks and tests). Each step applies
cancellations first, then asks the scheduler for the step's work within its token budget: the
KV of cached prompt prefixes is copied into newly admitted requests' slots, prompt chunks are
prefilled (one runner call each, each in its own slot), and every decoding row advances by one
token in a single runner call. The rows that produced logits (a prompt's last chunk, decode rows)
are sampled together; a row finishes on end-of-text, a stop token id or its length, and its slot
is free for the next step. With speculative decoding on (``spec.py``), a decoding row that has a draft
is verified instead: its draft goes through the runner as one multi-token row, and the row emits
the accepted tokens and one more in the same step.

The core knows nothing about text: stop strings, detokenization and logprob strings are the
frontend's (it cancels a request whose text hit a stop string). Per-slot arrays hold what the
step reads for every row, so a step does no Python work per row except where a row asked for
something (logprobs, a grammar, stop token ids).

Convert: ``AddRequest`` --> scheduler ``Sequence`` + sampler slot; a step --> one ``StepOutput``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from nextoken.export.artifact import Artifact
from nextoken.export.runtime import Runner
from nextoken.serve.engine.prefill import Budget, Costs, auto_cap, calibrate, plan_calls
from nextoken.serve.engine.prefix_cache import PrefixCache
from nextoken.serve.engine.sampler import BatchSampler
from nextoken.serve.engine.scheduler import Scheduler, Sequence
from nextoken.serve.engine.spec import SpecCounts, SpecOptions, Speculator
from nextoken.serve.wire import (
    AddRequest,
    Finished,
    FinishReason,
    ParamError,
    RequestFailed,
    SamplingParams,
    Started,
    StepOutput,
    StructuredSpec,
)

logger = logging.getLogger("nextoken.serve")


class RequestRejected(ParamError):
    """A request the version that would run it cannot take (a client error: HTTP 400)."""

    def failure(self, rid: str) -> RequestFailed:
        return RequestFailed(rid, 400, self.message, self.param, self.code)


@dataclass
class EngineOptions:
    """The engine's share of ``ServeConfig`` (see serve/config.py for what each means)."""

    max_slots: int = 32
    max_model_len: int = 0  # 0 = the model's context
    max_num_batched_tokens: int = 0  # 0 = sized to the model (prefill.Budget, calibrated at start-up)
    prefix_cache_bytes: int = 64 << 20
    prefix_block_size: int = 16
    device: str = "cpu"
    threads: int = 0
    spec: SpecOptions | None = None  # speculative decoding (serve/engine/spec.py); None = off


@dataclass
class StepStats:
    """Per-step figures for metrics: filled by the core, read by the metrics layer."""

    duration_s: float
    prefill_s: float  # runner time on prompt chunks (incl. prefix-cache copies)
    decode_s: float  # runner time on the decode call
    batch_size: int  # rows that produced a token
    prefill_tokens: int
    decode_tokens: int
    running: int
    waiting: int
    kv_cache_usage: float  # tokens in the cache / token capacity of the cache
    prefix_hit_tokens: int  # cumulative
    prefix_queried_tokens: int  # cumulative
    spec: SpecCounts | None = None  # this step's speculative decoding (None: no row was verified)


@dataclass
class _Req:
    """The core's own per-request state (beside the scheduler's Sequence and the sampler's slot)."""

    seq: Sequence
    params: SamplingParams
    model: str
    stop_ids: frozenset[int]  # token ids that end it (end-of-text unless ignore_eos, plus stop_token_ids)
    matcher: Any = None  # its grammar's state (serve/engine/grammar.py Matcher) when it asked for structured output
    started: bool = False
    prompt_lp: list[np.ndarray] | None = None  # prompt logprobs per chunk: (n,) each
    prompt_top_ids: list[np.ndarray] | None = None  # (n, N) each
    prompt_top_lps: list[np.ndarray] | None = None


class EngineCore:
    def __init__(self, artifact: Artifact, options: EngineOptions | None = None,
                 on_step: Callable[[StepStats], None] | None = None) -> None:
        o = options or EngineOptions()
        self.artifact = artifact
        self.model_id = artifact.model_id
        self.options = o
        # the server's engine: the HTTP process and clients share the cores (export/runtime.py session_options)
        self.runner = Runner(artifact, max_slots=o.max_slots, max_len=o.max_model_len or None, device=o.device,
                             threads=o.threads, spin_between_calls=False)
        self.max_len = self.runner.spec.max_len
        self.vocab_size = self.runner.vocab_size
        self.eos_ids = tuple(artifact.eos_ids)  # every end-of-text token (Llama-3 instruct: three); [0] the model's
        self.eos_id = self.eos_ids[0]
        self._eos = np.asarray(self.eos_ids, dtype=np.int64)
        self.prefix_cache = (PrefixCache(self.runner, block_size=o.prefix_block_size, max_bytes=o.prefix_cache_bytes)
                             if o.prefix_cache_bytes > 0 else None)
        self.costs: Costs | None = None
        if o.max_num_batched_tokens:
            self.budget = Budget(o.max_num_batched_tokens)
        else:  # sized to the model: what a call costs here, measured now (the slots are all free)
            self.costs = calibrate(self.runner)
            self.budget = Budget(auto_cap(o.max_slots, self.vocab_size), self.costs.call_tokens)
        self.scheduler = self._new_scheduler()
        self.sampler = BatchSampler(o.max_slots, self.vocab_size, self.eos_ids)
        self.on_step = on_step
        self.reqs: dict[str, _Req] = {}
        S = o.max_slots
        # per-slot state the step reads for every row, so it never walks Python objects row by row
        self.slot_rid: list[str | None] = [None] * S
        self.lengths = np.zeros(S, dtype=np.int64)  # tokens in each slot's cache
        self.last_token = np.zeros(S, dtype=np.int64)  # the token to feed next
        self.generated = np.zeros(S, dtype=np.int64)
        self.max_tokens = np.zeros(S, dtype=np.int64)
        self.stop_eos = np.zeros(S, dtype=bool)  # end-of-text ends this row
        self.extra_stops = np.zeros(S, dtype=bool)  # this row has stop_token_ids (checked one by one)
        self.matchers: list[Any] = [None] * S  # slot -> grammar matcher (structured output), or None
        self._grammar: Any = None  # GrammarCompiler, made on the first structured request
        self._masks: np.ndarray | None = None  # (S, V) float32 additive grammar masks, reused every step
        self.spec = Speculator(o.spec, self) if o.spec is not None else None  # speculative decoding, when on

    def _compile(self, spec: StructuredSpec) -> Any:
        from nextoken.serve.engine.grammar import GrammarCompiler, GrammarError

        if self._grammar is None:
            self._grammar = GrammarCompiler(self.artifact.tokenizer_path.read_text(encoding="utf-8"),
                                            self.vocab_size, self.eos_id)
            self._masks = np.zeros((self.options.max_slots, self.vocab_size), dtype=np.float32)
        try:
            return self._grammar.compile(spec)
        except GrammarError as e:
            raise RequestRejected(str(e), e.param) from None

    # --- requests ------------------------------------------------------------------------------
    def add(self, req: AddRequest) -> None:
        """Queue a request; raises ``RequestRejected`` when this version cannot run it."""
        if req.rid in self.reqs:
            raise ValueError(f"request id {req.rid!r} is already in the engine")
        ids = list(req.prompt_ids)
        p = req.params
        try:  # the HTTP side checked against the version it saw; this is the version that runs it
            max_tokens = p.check(ids, vocab_size=self.vocab_size, context=self.max_len)
        except ParamError as e:
            raise RequestRejected(e.message, e.param, e.code) from None
        matcher = None
        if p.structured is not None:
            if p.ignore_eos:  # a finished structure allows only end-of-text
                raise RequestRejected("ignore_eos cannot be combined with structured output: once the structure is "
                                      "complete only end-of-text may follow", "ignore_eos")
            matcher = self._compile(p.structured)
        seq = Sequence(req.rid, ids, max_tokens, req.arrival, use_prefix_cache=p.prompt_logprobs is None)
        stops = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else frozenset(self.eos_ids))
        self.reqs[req.rid] = _Req(seq, p, self.model_id, stops, matcher)
        self.scheduler.add(seq)

    def cancel(self, rid: str) -> None:
        self.scheduler.cancel(rid)

    def abort_all(self) -> list[str]:
        """Drop every running and waiting request (after a failed step); returns their ids.

        A failed step may have left the slots half-written; they are all freed, and the next
        requests overwrite them from position 0, so the core is as good as new.
        """
        rids = list(self.reqs)
        for slot, rid in enumerate(self.slot_rid):
            if rid is not None:
                self._release_slot(slot)
        self.scheduler = self._new_scheduler()
        self.reqs.clear()
        return rids

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def _new_scheduler(self) -> Scheduler:
        allowance = self.budget.allowance if self.budget.call_tokens is not None else None
        return Scheduler(self.options.max_slots, self.budget.cap, self.prefix_cache, allowance)

    @property
    def num_requests(self) -> int:
        return len(self.reqs)

    # --- slots ---------------------------------------------------------------------------------
    def _bind_slot(self, r: _Req) -> None:
        s = r.seq.slot
        self.slot_rid[s] = r.seq.rid
        self.sampler.add(s, r.params, r.seq.prompt_ids)
        self.lengths[s] = r.seq.num_cached
        self.generated[s] = 0
        self.max_tokens[s] = r.seq.max_tokens
        self.stop_eos[s] = not r.params.ignore_eos
        self.extra_stops[s] = bool(r.params.stop_token_ids)
        self.matchers[s] = r.matcher
        if self.spec is not None:
            self.spec.bind(s, r.seq.prompt_ids, r.params.speculative)

    def _release_slot(self, slot: int) -> None:
        self.slot_rid[slot] = None
        self.matchers[slot] = None
        self.sampler.remove(slot)
        self.lengths[slot] = 0

    # --- the step ------------------------------------------------------------------------------
    def step(self) -> StepOutput:
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        out = StepOutput(time=0.0)
        for seq in sched.cancelled:
            del self.reqs[seq.rid]
            generated = 0
            if seq.slot >= 0:  # it held a slot (the scheduler has taken it back already)
                generated = int(self.generated[seq.slot])
                self._release_slot(seq.slot)
            out.finished[seq.rid] = Finished(FinishReason.CANCELLED, seq.num_prompt, generated)

        t_prefill = time.perf_counter()
        for seq in sched.admitted:
            r = self.reqs[seq.rid]
            self._bind_slot(r)
            if seq.prefix_keys:
                self.prefix_cache.load(seq.prefix_keys, seq.slot)
        sample_slots: list[int] = []  # rows to sample this step, in order
        sample_logits: list[np.ndarray] = []  # (V,) each for prefill completions; decode adds a block
        scored: list[_Req] = []  # prompt-only requests (max_tokens 0) that finished prefilling
        chunk_logits = self._prefill(sched.prefill)
        for chunk, logits in zip(sched.prefill, chunk_logits, strict=True):  # logits (T, V) each
            seq, r = chunk.seq, self.reqs[chunk.seq.rid]
            if r.params.prompt_logprobs is not None:
                self._prompt_logprobs(r, chunk.start, logits)
            if chunk.completes_prompt:
                if self.prefix_cache is not None:
                    seq.num_written = self.prefix_cache.store(seq.prompt_ids, seq.num_prompt, seq.slot)
                if seq.max_tokens == 0:
                    scored.append(r)
                else:
                    sample_slots.append(seq.slot)
                    sample_logits.append(logits[-1])
        t_decode = time.perf_counter()

        decode = sched.decode
        drafts = self.spec.propose(self, decode) if self.spec is not None and decode else None
        if drafts:  # rows with a draft are verified on their own (spec.py); the rest decode together
            decode = [seq for seq in decode if seq.slot not in drafts]
        decode_slots = np.fromiter((s.slot for s in decode), dtype=np.int64, count=len(decode))
        if decode_slots.size:
            dec_logits = self.runner.decode(decode_slots, self.last_token[decode_slots], self.lengths[decode_slots],
                                            self.lengths)  # (n, V)
            self.lengths[decode_slots] += 1
        t_sample = time.perf_counter()

        n_prefilled = len(sample_slots)
        slots = np.concatenate([np.asarray(sample_slots, dtype=np.int64), decode_slots])
        if slots.size:
            logits = dec_logits if not n_prefilled else (
                np.stack(sample_logits) if not decode_slots.size else np.concatenate([np.stack(sample_logits),
                                                                                      dec_logits]))
            out.time = time.time()
            self._emit(slots, logits, out, n_prefilled)
        verify_s = self.spec.verify(self, drafts, out) if drafts else 0.0
        for r in scored:
            self._start(r, out)
            del self.reqs[r.seq.rid]
            self.scheduler.finish(r.seq.rid)
            self._release_slot(r.seq.slot)
            out.finished[r.seq.rid] = Finished(FinishReason.LENGTH, r.seq.num_prompt, 0)
        if not out.time:
            out.time = time.time()
        if self.on_step is not None:
            t1 = time.perf_counter()
            pc = self.prefix_cache.stats if self.prefix_cache is not None else None
            self.on_step(StepStats(
                duration_s=t1 - t0, prefill_s=t_decode - t_prefill, decode_s=t_sample - t_decode + verify_s,
                batch_size=int(slots.size) + len(drafts or ()), prefill_tokens=sum(c.length for c in sched.prefill),
                decode_tokens=int(decode_slots.size) + sum(len(d) + 1 for d in (drafts or {}).values()),
                running=len(self.scheduler.running),
                waiting=len(self.scheduler.waiting),
                kv_cache_usage=float(self.lengths.sum()) / self.runner.spec.tokens,
                prefix_hit_tokens=pc.hit_tokens if pc else 0, prefix_queried_tokens=pc.queried_tokens if pc else 0,
                spec=self.spec.take_counts() if drafts else None))
        return out

    def _emit(self, slots: np.ndarray, logits: np.ndarray, out: StepOutput, n_prefilled: int = 0) -> np.ndarray:
        """Sample one token for each row (logits (n, V) of ``slots`` (n,)), add the rows to ``out`` and end the
        rows that are done; the first ``n_prefilled`` rows are first tokens. Returns which rows ended (n,)."""
        allowed, row_matchers = None, None
        if self._grammar is not None and any(self.matchers):
            row_matchers = [self.matchers[s] for s in slots.tolist()]
            if any(m is not None for m in row_matchers):
                allowed = self._masks[:slots.size]  # (n, V); rows without a grammar are neither written nor read
                self._grammar.fill_masks(row_matchers, allowed)
        res = self.sampler.sample(logits, slots, allowed)
        tokens = res.token_ids
        rids = [self.slot_rid[s] for s in slots]
        out.add_rows(rids, tokens, res.logprobs, res.top_ids, res.top_logprobs)
        self.last_token[slots] = tokens
        self.generated[slots] += 1
        if self.spec is not None:
            self.spec.record(slots, tokens)
        done = self.generated[slots] >= self.max_tokens[slots]
        done |= self.lengths[slots] + 1 > self.max_len  # nowhere to feed the token back
        stopped = self.stop_eos[slots] & (tokens[:, None] == self._eos).any(axis=1)  # (n,); np.isin costs ~15 us
        for i in np.flatnonzero(self.extra_stops[slots]):
            stopped[i] |= int(tokens[i]) in self.reqs[rids[i]].stop_ids
        if allowed is not None:
            for i, m in enumerate(row_matchers):
                if m is not None and not stopped[i]:
                    m.accept(int(tokens[i]))
                    # the structure is complete: only end-of-text could follow, so end it now
                    stopped[i] |= m.is_terminated()
        for i in range(n_prefilled):
            self._start(self.reqs[rids[i]], out)
        ended = stopped | done
        for i in np.flatnonzero(ended):
            rid, slot, stop = rids[i], int(slots[i]), bool(stopped[i])
            r = self.reqs.pop(rid)
            tok = int(tokens[i])
            reason = FinishReason.STOP if stop else FinishReason.LENGTH
            out.finished[rid] = Finished(reason, r.seq.num_prompt, int(self.generated[slot]),
                                         tok if stop and tok in r.stop_ids else None)
            self.scheduler.finish(rid)
            self._release_slot(slot)
        return ended

    def _prefill(self, chunks: list[Any]) -> list[np.ndarray]:
        """Run the step's prompt chunks in as few runner calls as pay (prefill.plan_calls); logits (T, V) each."""
        out: list[np.ndarray | None] = [None] * len(chunks)
        call_tokens = self.budget.call_tokens or (self.costs.call_tokens if self.costs else 16)
        plan = plan_calls([(c.seq.slot, c.start, c.length) for c in chunks], self.lengths, call_tokens)
        for group in plan:
            ids = [chunks[i].seq.prompt_ids[chunks[i].start:chunks[i].start + chunks[i].length] for i in group]
            if len(group) == 1:
                c = chunks[group[0]]
                out[group[0]] = self.runner.prefill(c.seq.slot, ids[0], c.start)
            else:
                logits = self.runner.prefill_first([chunks[i].seq.slot for i in group], ids, self.lengths)
                for row, i in enumerate(group):
                    out[i] = logits[row, :chunks[i].length]
            for i in group:
                self.lengths[chunks[i].seq.slot] = chunks[i].start + chunks[i].length
        return out  # type: ignore[return-value]

    def _start(self, r: _Req, out: StepOutput) -> None:
        seq = r.seq
        st = Started(seq.num_prompt, seq.num_cached, (seq.admitted or out.time) - seq.arrival, self.model_id,
                     written_tokens=seq.num_written)
        if r.prompt_lp is not None:
            st.prompt_logprobs = np.concatenate(r.prompt_lp)[: seq.num_prompt - 1]
            st.prompt_top_ids = np.concatenate(r.prompt_top_ids)[: seq.num_prompt - 1]
            st.prompt_top_logprobs = np.concatenate(r.prompt_top_lps)[: seq.num_prompt - 1]
        out.started[seq.rid] = st
        r.started = True

    def _prompt_logprobs(self, r: _Req, start: int, logits: np.ndarray) -> None:
        """Logprobs of prompt tokens start+1 .. start+T under the chunk's logits (T, V)."""
        ids = r.seq.prompt_ids
        T = logits.shape[0]
        targets = ids[start + 1:start + T + 1]  # the last prompt position predicts a generated token: none here
        if not targets:
            return
        lp, top_ids, top_lps = self.sampler.prompt_logprobs(logits[:len(targets)], np.asarray(targets),
                                                            r.params.prompt_logprobs)
        if r.prompt_lp is None:
            r.prompt_lp, r.prompt_top_ids, r.prompt_top_lps = [], [], []
        r.prompt_lp.append(lp)
        r.prompt_top_ids.append(top_ids)
        r.prompt_top_lps.append(top_lps)

