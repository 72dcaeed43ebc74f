"""Serving metrics from per-request timings, defined as ``vllm bench serve`` defines them.

- TTFT: from sending the request to the first chunk that carries a token.
- TPOT: ``(latency - TTFT) / (output_tokens - 1)`` per request; requests with one token have none.
- ITL: every gap between consecutive token-carrying chunks, pooled over requests.
- E2E latency: from sending to the last byte.
- Throughputs divide by the level's wall-clock duration; goodput counts only requests that met
  every SLO given. Percentiles interpolate linearly (numpy's default), so they match numpy's.

Pure arithmetic: no clock, no I/O, so it can be tested on known timings.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ErrorDetail", "RequestRecord", "LevelSummary", "percentile", "distribution", "summarize", "SLO_KEYS"]

SLO_KEYS = ("ttft", "tpot", "e2el")  # milliseconds, as on the command line


@dataclass(frozen=True)
class ErrorDetail:
    """Why one request failed, in the server's words: the OpenAI error body's message, type, param
    and code (for a broken connection or stream, only the SDK's message). Hashable, so identical
    failures group into one line of the report."""

    message: str
    type: str | None = None
    param: str | None = None
    code: str | None = None


@dataclass
class RequestRecord:
    """What one request did; times in seconds."""

    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None  # failure kind, e.g. "OverloadedError(429)" or "StreamError"
    error_detail: ErrorDetail | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def distribution(seconds: Sequence[float]) -> dict[str, float] | None:
    """mean / p50 / p90 / p99 in milliseconds, or None when there is nothing to describe."""
    if not seconds:
        return None
    ms = [s * 1000.0 for s in seconds]
    return {"mean": sum(ms) / len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99)}


@dataclass
class LevelSummary:
    """The metrics of one load level (one concurrency, or one request rate)."""

    level: str  # "concurrency=4" or "rate=2.0"
    concurrency: int | None
    request_rate: float | None
    duration_s: float
    completed: int
    failed: int
    failures: dict[str, int]
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: dict[str, float] | None
    tpot_ms: dict[str, float] | None
    itl_ms: dict[str, float] | None
    e2el_ms: dict[str, float] | None
    goodput: float | None = None  # requests/s meeting every SLO, when SLOs were given
    slo_ms: dict[str, float] | None = None
    # One entry per distinct failure, most frequent first: {kind, count, message, type, param, code}.
    failure_details: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def meets_slo(record: RequestRecord, slo_ms: Mapping[str, float]) -> bool:
    if not record.ok:
        return False
    values = {"ttft": record.ttft, "tpot": record.tpot if record.tpot is not None else 0.0,
              "e2el": record.latency}
    return all(values[k] is not None and values[k] * 1000.0 <= limit for k, limit in slo_ms.items())


def summarize(records: Sequence[RequestRecord], duration_s: float, *, concurrency: int | None = None,
              request_rate: float | None = None, slo_ms: Mapping[str, float] | None = None) -> LevelSummary:
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    unknown = set(slo_ms or {}) - set(SLO_KEYS)
    if unknown:
        raise ValueError(f"unknown SLO metric(s) {sorted(unknown)}; use {', '.join(SLO_KEYS)}")
    ok = [r for r in records if r.ok]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    level = f"concurrency={concurrency}" if request_rate is None else f"rate={request_rate:g}"
    return LevelSummary(
        level=level,
        concurrency=concurrency,
        request_rate=request_rate,
        duration_s=duration_s,
        completed=len(ok),
        failed=len(records) - len(ok),
        failures=dict(Counter(r.error or "unknown" for r in records if not r.ok)),
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        request_throughput=len(ok) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        ttft_ms=distribution([r.ttft for r in ok if r.ttft is not None]),
        tpot_ms=distribution([t for r in ok if (t := r.tpot) is not None]),
        itl_ms=distribution([gap for r in ok for gap in r.itl]),
        e2el_ms=distribution([r.latency for r in ok]),
        goodput=sum(meets_slo(r, slo_ms) for r in records) / duration_s if slo_ms else None,
        slo_ms=dict(slo_ms) if slo_ms else None,
        failure_details=failure_details(records),
    )


def failure_details(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """Failed requests grouped by kind and error detail, most frequent first."""
    counts = Counter((r.error or "unknown", r.error_detail) for r in records if not r.ok)
    details = [{"kind": kind, "count": n, "message": d and d.message, "type": d and d.type,
                "param": d and d.param, "code": d and d.code} for (kind, d), n in counts.items()]
    return sorted(details, key=lambda d: (-d["count"], d["kind"], d["message"] or ""))
