"""Send a workload and time every token. Closed loop: ``concurrency`` workers each send their next
request when the previous one ends. Open loop: Poisson arrivals at ``request_rate`` per second, at
most ``max_concurrency`` in flight (later arrivals wait, as in ``vllm bench serve``).

The client runs with retries off: a 429 is a failure to count, not something to hide.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._async_client import AsyncClient
from .._exceptions import APIStatusError, NextokenError
from .stats import ErrorDetail, RequestRecord
from .workload import WorkItem

__all__ = ["send_one", "run_closed", "run_open"]

OnDone = Callable[[RequestRecord], None]


def failure_kind(exc: NextokenError) -> str:
    if isinstance(exc, APIStatusError):
        return f"{type(exc).__name__}({exc.status_code})"
    return type(exc).__name__


def error_detail(exc: NextokenError) -> ErrorDetail:
    """The server's own explanation (its error body), so a sweep that fails says why."""
    if isinstance(exc, APIStatusError):
        return ErrorDetail(exc.message, _text(exc.type), _text(exc.param), _text(exc.code))
    return ErrorDetail(exc.message)


def _text(value: object) -> str | None:
    # Any JSON may come from a foreign server; a string keeps the detail hashable for grouping.
    return None if value is None else str(value)


async def send_one(client: AsyncClient, item: WorkItem, sampling: Mapping[str, Any]) -> RequestRecord:
    """Stream one completion; TTFT and every ITL gap are taken at chunks that carry tokens."""
    start = time.perf_counter()
    ttft: float | None = None
    last = start
    gaps: list[float] = []
    counted = 0  # tokens seen in the stream, used when the server reports no usage
    usage = None
    try:
        stream = await client.stream(item.prompt, max_tokens=item.max_tokens, **sampling)
        async with stream:
            async for event in stream:
                now = time.perf_counter()
                if event.final:
                    usage = event.usage
                    continue
                if ttft is None:
                    ttft = now - start
                else:
                    gaps.append(now - last)
                last = now
                counted += max(len(event.token_ids), 1)
    except NextokenError as e:
        return RequestRecord(ok=False, latency=time.perf_counter() - start, error=failure_kind(e),
                             error_detail=error_detail(e))
    latency = time.perf_counter() - start
    return RequestRecord(
        ok=True, latency=latency, ttft=ttft, itl=gaps,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        output_tokens=usage.completion_tokens if usage and usage.completion_tokens else counted,
    )


async def run_closed(client: AsyncClient, items: Sequence[WorkItem], concurrency: int,
                     sampling: Mapping[str, Any], on_done: OnDone | None = None) -> list[RequestRecord]:
    queue = list(reversed(items))  # pop() from the end keeps the workload's order
    records: list[RequestRecord] = []

    async def worker() -> None:
        while queue:
            record = await send_one(client, queue.pop(), sampling)
            records.append(record)
            if on_done:
                on_done(record)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(items)))))
    return records


async def run_open(client: AsyncClient, items: Sequence[WorkItem], request_rate: float,
                   max_concurrency: int | None, sampling: Mapping[str, Any], seed: int,
                   on_done: OnDone | None = None) -> list[RequestRecord]:
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    records: list[RequestRecord] = []

    async def one(item: WorkItem) -> None:
        if limit is None:
            record = await send_one(client, item, sampling)
        else:
            async with limit:
                record = await send_one(client, item, sampling)
        records.append(record)
        if on_done:
            on_done(record)

    tasks = []
    for i, item in enumerate(items):
        tasks.append(asyncio.create_task(one(item)))
        if i + 1 < len(items) and request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(request_rate))  # Poisson process: exponential gaps
    await asyncio.gather(*tasks)
    return records
