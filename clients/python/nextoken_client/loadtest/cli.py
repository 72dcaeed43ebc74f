"""``nextoken-loadtest``: argument parsing and the level loop; the work is in the sibling modules.

Example::

    nextoken-loadtest --base-url http://127.0.0.1:8000 --concurrency 1,4,16,32 --num-requests 64 \\
        --input-len 32 --output-len uniform:16:64 --slo ttft=500,tpot=50 --json-out r.json --plot-dir plots
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from .. import __version__
from .._async_client import AsyncClient
from .._exceptions import NextokenError
from .report import Progress, format_table, write_json
from .runner import run_closed, run_open
from .stats import SLO_KEYS, LevelSummary, RequestRecord, summarize
from .workload import LengthSpec, WorkItem, file_workload, synthetic_workload

__all__ = ["main", "build_parser"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return values


def _rate_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates (or inf), got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"request rates must be > 0, got {text!r}")
    return values


def _slo(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--slo wants KEY=MS pairs like ttft=500,tpot=50, got {text!r}") from None
        if key.strip() not in SLO_KEYS:
            raise argparse.ArgumentTypeError(f"--slo keys are {', '.join(SLO_KEYS)}, got {key!r}")
    return out


def _length(flag: str) -> Any:
    def parse(text: str) -> LengthSpec:
        try:
            return LengthSpec.parse(text, flag)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nextoken-loadtest", description="Load-test a nextoken (OpenAI-compatible) "
                                "server and report TTFT, TPOT, ITL, latency and throughput as vllm bench serve does.")
    p.add_argument("--base-url", required=True, help="the server to test, e.g. http://127.0.0.1:8000 (the only "
                   "host this tool contacts)")
    p.add_argument("--api-key", default=None, help="bearer key (default: $NEXTOKEN_API_KEY)")
    p.add_argument("--model", default=None, help="model name to send (default: the server's default)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_int_list, default=None,
                      help="closed loop: requests in flight; a comma list sweeps levels (default 1,4,16)")
    load.add_argument("--request-rate", type=_rate_list, default=None,
                      help="open loop: Poisson arrivals per second (comma list sweeps; 'inf' sends all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="open loop: cap on requests in flight")
    p.add_argument("--num-requests", type=int, default=64, help="measured requests per level")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests before each level")
    p.add_argument("--input-len", type=_length("--input-len"), default=LengthSpec("fixed", 32),
                   help="prompt length in words: N, uniform:LO:HI or normal:MEAN:STD (default 32)")
    p.add_argument("--output-len", type=_length("--output-len"), default=LengthSpec("fixed", 64),
                   help="max_tokens: N, uniform:LO:HI or normal:MEAN:STD (default 64)")
    p.add_argument("--prompts-file", type=Path, default=None,
                   help="prompts, one per line or JSON lines {\"prompt\", \"max_tokens\"}")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--extra-body", type=json.loads, default=None, help="JSON object merged into every request")
    p.add_argument("--seed", type=int, default=0, help="seeds prompts, lengths and arrival times")
    p.add_argument("--slo", type=_slo, default=None, help="goodput SLOs in ms, e.g. ttft=500,tpot=50,e2el=5000")
    p.add_argument("--read-timeout", type=float, default=60.0, help="longest wait between tokens (s)")
    p.add_argument("--json-out", type=Path, default=None, help="write all levels' metrics here")
    p.add_argument("--plot-dir", type=Path, default=None, help="write PNG plots here (needs [plots] extra)")
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")
    return p


def _workload(args: argparse.Namespace, n: int, seed: int) -> list[WorkItem]:
    if args.prompts_file is not None:
        return file_workload(args.prompts_file, n, args.output_len, seed)
    return synthetic_workload(n, args.input_len, args.output_len, seed)


async def _run(args: argparse.Namespace) -> tuple[list[LevelSummary], list[list[RequestRecord]]]:
    levels: list[tuple[int | None, float | None]] = (
        [(args.max_concurrency, r) for r in args.request_rate] if args.request_rate
        else [(c, None) for c in (args.concurrency or [1, 4, 16])])
    most = max([c or 0 for c, _ in levels] + [args.max_concurrency or 0, 1])
    if args.request_rate and not args.max_concurrency:
        most = max(most, args.num_requests)  # uncapped open loop: every request may be in flight
    sampling: dict[str, Any] = {"temperature": args.temperature}
    if args.model:
        sampling["model"] = args.model
    if args.extra_body:
        sampling["extra_body"] = args.extra_body
    # One connection per request in flight, so the pool never becomes the bottleneck being measured.
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=most + 4, max_keepalive_connections=most + 4))
    summaries: list[LevelSummary] = []
    all_records: list[list[RequestRecord]] = []
    async with http, AsyncClient(args.base_url, api_key=args.api_key, max_retries=0, read_timeout=args.read_timeout,
                                 http_client=http) as client:
        await client.models()  # fail fast, with the SDK's message, if the URL is wrong or the key refused
        for i, (concurrency, rate) in enumerate(levels):
            label = f"rate={rate:g}" if rate is not None else f"concurrency={concurrency}"
            if args.warmup:
                warm = _workload(args, args.warmup, args.seed + 10_000 + i)
                await run_closed(client, warm, concurrency or 1, sampling)
            items = _workload(args, args.num_requests, args.seed)  # the same requests at every level
            progress = Progress(label, len(items), enabled=False if args.no_progress else None)
            start = time.perf_counter()
            if rate is None:
                records = await run_closed(client, items, concurrency or 1, sampling, progress.update)
            else:
                records = await run_open(client, items, rate, concurrency, sampling, args.seed, progress.update)
            duration = time.perf_counter() - start
            progress.finish()
            summaries.append(summarize(records, duration, concurrency=concurrency, request_rate=rate,
                                       slo_ms=args.slo))
            all_records.append(records)
    return summaries, all_records


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_requests < 1 or args.warmup < 0:
        build_parser().error("--num-requests must be >= 1 and --warmup >= 0")
    try:
        summaries, records = asyncio.run(_run(args))
    except NextokenError as e:
        print(f"nextoken-loadtest: {args.base_url}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # an unreadable prompts file, say
        print(f"nextoken-loadtest: {e}", file=sys.stderr)
        return 2
    print(format_table(summaries))
    if args.json_out is not None:
        config = {k: (str(v) if isinstance(v, (Path, LengthSpec)) else v) for k, v in vars(args).items()}
        config["client_version"] = __version__
        write_json(args.json_out, config, summaries)
        print(f"wrote {args.json_out}")
    if args.plot_dir is not None:
        from .plots import plot_all

        try:
            for path in plot_all(args.plot_dir, summaries, records):
                print(f"wrote {path}")
        except RuntimeError as e:
            print(f"nextoken-loadtest: {e}", file=sys.stderr)
            return 2
    return 0 if any(s.completed for s in summaries) else 1


if __name__ == "__main__":
    raise SystemExit(main())
