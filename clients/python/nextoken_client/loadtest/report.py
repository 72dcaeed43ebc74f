"""Show results: a progress bar while a level runs, a table of all levels, a JSON file."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from .stats import LevelSummary, RequestRecord

__all__ = ["Progress", "format_table", "describe_failure", "write_json"]

# Messages often differ per request (they quote its token count), so a failing sweep could print
# one line per request; the console shows the most frequent, the JSON keeps them all.
MAX_FAILURE_LINES = 5


class Progress:
    """A one-line bar on stderr, redrawn at most 10 times a second; silent when not a terminal
    (CI logs would fill with carriage returns), where only the level's closing line is printed."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if enabled is None else enabled
        self.done = self.failed = 0
        self.start = time.perf_counter()
        self._drawn = 0.0

    def update(self, record: RequestRecord) -> None:
        self.done += 1
        self.failed += not record.ok
        now = time.perf_counter()
        if self.live and (now - self._drawn > 0.1 or self.done == self.total):
            self._drawn = now
            self.stream.write("\r" + self._line(now))
            self.stream.flush()

    def _line(self, now: float) -> str:
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        rate = self.done / max(now - self.start, 1e-9)
        return (f"{self.label:<16} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"failed {self.failed}  {rate:.1f} req/s")

    def finish(self) -> None:
        self.stream.write(("\r" if self.live else "") + self._line(time.perf_counter()) + "\n")
        self.stream.flush()


def _rows(s: LevelSummary) -> list[tuple[str, str]]:
    rows = [
        ("completed", f"{s.completed}"),
        ("failed", f"{s.failed}"),
        ("duration (s)", f"{s.duration_s:.2f}"),
        ("input tokens", f"{s.total_input_tokens}"),
        ("output tokens", f"{s.total_output_tokens}"),
        ("request throughput (req/s)", f"{s.request_throughput:.2f}"),
        ("output throughput (tok/s)", f"{s.output_throughput:.1f}"),
        ("total throughput (tok/s)", f"{s.total_token_throughput:.1f}"),
    ]
    for name, dist in (("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms), ("E2E latency", s.e2el_ms)):
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append((f"{name} {stat} (ms)", "-" if dist is None else f"{dist[stat]:.1f}"))
    if s.goodput is not None:
        rows.append(("goodput (req/s)", f"{s.goodput:.2f}"))
    return rows


def format_table(summaries: Sequence[LevelSummary]) -> str:
    """One column per level, one row per metric, then each level's failures with the server's message."""
    columns = [dict(_rows(s)) for s in summaries]
    names = [name for name, _ in _rows(summaries[0])] if summaries else []
    headers = [s.level for s in summaries]
    first = max([len("metric"), *map(len, names)])
    widths = [max(len(h), *(len(c[n]) for n in names)) for h, c in zip(headers, columns, strict=True)]
    lines = ["  ".join(["metric".ljust(first), *(h.rjust(w) for h, w in zip(headers, widths, strict=True))])]
    lines.append("-" * len(lines[0]))
    for n in names:
        lines.append("  ".join([n.ljust(first), *(c[n].rjust(w) for c, w in zip(columns, widths, strict=True))]))
    for s in summaries:
        if s.failed:
            lines.append(f"failures at {s.level}: {s.failed} of {s.completed + s.failed} requests")
            lines += [f"  {d['count']} x {describe_failure(d)}" for d in s.failure_details[:MAX_FAILURE_LINES]]
            rest = s.failure_details[MAX_FAILURE_LINES:]
            if rest:
                lines.append(f"  ... {len(rest)} more distinct failures ({sum(d['count'] for d in rest)} requests); "
                             "--json-out lists them all")
    return "\n".join(lines)


def describe_failure(detail: Mapping[str, Any]) -> str:
    """``ValidationError(400): <server message> (type: ..., param: ..., code: ...)``."""
    text = str(detail["kind"])
    if detail.get("message"):
        text += f": {detail['message']}"
    extra = ", ".join(f"{k}: {detail[k]}" for k in ("type", "param", "code") if detail.get(k))
    return f"{text} ({extra})" if extra else text


def write_json(path: Path, config: dict[str, Any], summaries: Sequence[LevelSummary]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"config": config, "levels": [s.to_dict() for s in summaries]}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # readers never see half a file
