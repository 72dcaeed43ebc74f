"""Speculative decoding (issue 24): the same server with and without ``--speculative ngram``, interleaved.

Two ``nextoken serve`` processes on one artifact, up for the whole run (an idle one uses no CPU):
A without speculation, B with ``--speculative ngram``. Each round runs every case on A then B, the next
round B then A, so drift on a shared machine falls on both. Cases:

- ``extract``: 1 stream, greedy: a prompt that holds a passage of standard-library source and then
  starts it again (its first line), so a model that copies from its context reproduces the rest; output
  tok/s, the acceptance rate (from B's ``nextoken_spec_decode_*`` counters) and whether B's text equals A's.
- ``sample``: 1 stream, T = 1 from the start of a standard-library file (nothing to copy), seeded per request
  so A and B generate the very same tokens: tok/s and acceptance.
- ``streams32``: 32 concurrent streams of the ``extract`` requests: speculation must turn itself off
  (``--speculative-disable-by-batch-size``) and cost nothing.

Prints a markdown table (median and range over ``--rounds``) with ``uptime``; ``--write-results`` puts it in
benchmarks/RESULTS.md under "## Speculative decoding" (a re-run replaces it).

    python benchmarks/bench_spec.py ARTIFACT [--draft DRAFT_ARTIFACT] [--rounds 2] [--tokens 96] [--write-results]

With ``--draft`` a third server, ``--speculative draft --draft-model DRAFT_ARTIFACT``, runs every case too.

A random-weight model never accepts a draft: measure on a trained model that copies (e.g. the quickstart
preset on the built-in corpus), and look at its ``extract`` acceptance before reading the speed-up.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_vs_llama import NextokenServer, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEC = ("drafts", "draft_tokens", "accepted_tokens")


def passages(tokenize, budget: int, n: int) -> list[tuple[str, str]]:
    """``n`` extractive prompts of at most ``budget`` tokens (a standard-library function, then its first line
    again), each with the rest of the function: what a model that copies goes on with."""
    import argparse as a
    import json as j
    import shutil
    import textwrap

    out = []
    for fn in (textwrap.dedent, textwrap.indent, shutil.copyfile, j.dumps, a.ArgumentParser.add_argument_group,
               shutil.rmtree, textwrap.wrap, j.loads):
        src = inspect.getsource(fn)
        lines = src.splitlines(keepends=True)
        while lines and len(tokenize("".join(lines) * 2)) > budget:
            lines = lines[:-1]
        if len(lines) >= 4:
            text = "".join(lines)
            out.append((text + "\n\n" + lines[0], text[len(lines[0]):]))
        if len(out) == n:
            break
    return out


def spec_counts(url: str) -> list[float]:
    from prometheus_client.parser import text_string_to_metric_families

    want = {f"nextoken_spec_decode_num_{n}_total": i for i, n in enumerate(SPEC)}
    got = [0.0] * len(SPEC)
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name in want:
                got[want[s.name]] += s.value
    return got


async def run_case(url: str, bodies: list[dict], streams: int) -> tuple[float, list[str]]:
    """Every body once per stream (streams x len(bodies) requests); returns output tok/s and the texts."""
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker() -> list[tuple[int, str]]:
            done = []
            for body in bodies:
                r = await client.post(url + "/v1/completions", json=body)
                r.raise_for_status()
                msg = r.json()
                done.append((msg["usage"]["completion_tokens"], msg["choices"][0]["text"]))
            return done

        t0 = time.perf_counter()
        results = await asyncio.gather(*[worker() for _ in range(streams)])
        wall = time.perf_counter() - t0
    tokens = sum(n for rs in results for n, _ in rs)
    return tokens / wall, [x for _n, x in results[0]]


def med(v: list[float], fmt: str = "{:,.1f}") -> str:
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96, help="max_tokens per request")
    ap.add_argument("--prompts", type=int, default=3, help="extractive prompts per run")
    ap.add_argument("--k", type=int, default=8, help="--num-speculative-tokens")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--draft", type=Path, help="a draft artifact (same tokenizer): also serve --speculative draft")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)

    from tokenizers import Tokenizer

    art = args.artifact
    cfg = json.loads((art / "config.json").read_text())
    ctx = int(cfg["n_positions"])
    tok = Tokenizer.from_file(str(art / "tokenizer.json"))
    tokenize = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    texts = passages(tokenize, ctx - args.tokens - 8, args.prompts)
    if not texts:
        raise SystemExit(f"no passage fits a {ctx}-token context with {args.tokens} tokens to generate")
    greedy = [{"prompt": t, "max_tokens": args.tokens, "temperature": 0} for t, _rest in texts]
    import textwrap

    start = inspect.getsource(textwrap)[:300]
    sample = [{"prompt": start[:120 + 40 * i], "max_tokens": args.tokens, "temperature": 1.0, "seed": i,
               "ignore_eos": True} for i in range(args.prompts)]
    cases = {"extract": (greedy, 1), "sample": (sample, 1), "streams32": (greedy, 32)}
    threads = ["--threads", str(args.threads)] if args.threads else []
    common = ["--max-batch-size", "32", *threads]
    k = ["--num-speculative-tokens", str(args.k)]
    flags = {"off": [], "ngram": ["--speculative", "ngram", *k]}
    if args.draft:
        flags["draft"] = ["--speculative", "draft", "--draft-model", str(args.draft), *k]
    spec_names = [n for n in flags if n != "off"]
    servers = {name: NextokenServer(art, *common, *f) for name, f in flags.items()}
    res: dict[str, dict[str, list]] = {c: {n: [] for n in (*flags, *(f"{v}:{x}" for v in spec_names
                                                                      for x in ("acc", "same", "drafts")))}
                                       for c in cases}
    copied: list[float] = []
    try:
        for s in servers.values():  # a first request pays for lazy set-up: not measured
            asyncio.run(run_case(s.url, greedy[:1], 1))
        for rnd in range(args.rounds):
            names = list(flags)
            order = names if rnd % 2 == 0 else names[::-1]
            for case, (bodies, streams) in cases.items():
                texts_of = {}
                for name in order:
                    url = servers[name].url
                    before = spec_counts(url)
                    tps, texts_of[name] = asyncio.run(run_case(url, bodies, streams))
                    after = spec_counts(url)
                    res[case][name].append(tps)
                    if name != "off":
                        d = [b - a for a, b in zip(before, after, strict=True)]
                        res[case][f"{name}:acc"].append(d[2] / d[1] if d[1] else 0.0)
                        res[case][f"{name}:drafts"].append(d[0])
                if case == "extract":  # how much of each passage the model's greedy output reproduces
                    share = [len(os.path.commonprefix([out, rest])) / len(rest)
                             for out, (_p, rest) in zip(texts_of["off"], texts, strict=True)]
                    copied.append(sum(share) / len(share))
                line = [f"round {rnd + 1} {case}: off {res[case]['off'][-1]:.1f} tok/s"]
                for name in spec_names:
                    res[case][f"{name}:same"].append(texts_of["off"] == texts_of[name])
                    line.append(f"{name} {res[case][name][-1]:.1f} tok/s (acceptance "
                                f"{res[case][name + ':acc'][-1]:.2f}, same text {res[case][name + ':same'][-1]})")
                print(", ".join(line), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    rows = ["| case | streams | tok/s off | speculative | tok/s | ratio | acceptance | drafts | same output |",
            "|---|--:|--:|---|--:|--:|--:|--:|---|"]
    for case, (_bodies, streams) in cases.items():
        r = res[case]
        for name in spec_names:
            ratios = [b / a for a, b in zip(r["off"], r[name], strict=True)]
            rows.append(f"| {case} | {streams} | {med(r['off'])} | {name} | {med(r[name])} | "
                        f"**{med(ratios, '{:.2f}')}** | {med(r[name + ':acc'], '{:.2f}')} | "
                        f"{int(sum(r[name + ':drafts']))} | {all(r[name + ':same'])} |")
    draft = f" --draft {args.draft.name}" if args.draft else ""
    body = [f"`python benchmarks/bench_spec.py {art.name}{draft} --rounds {args.rounds} --tokens {args.tokens} "
            f"--prompts {args.prompts} --k {args.k}` ({cfg['n_layer']} layers, {cfg['n_embd']} wide, context {ctx}, "
            f"vocab {cfg['vocab_size']}); `uptime` at the end: {uptime}", "",
            f"Greedy output without speculation reproduces {statistics.mean(copied):.0%} of the quoted passages "
            "(characters of each passage's rest matched from the start, mean over the prompts and rounds).", "",
            *rows]
    print("\n".join(body))
    if args.write_results:
        write_results(REPO / "benchmarks" / "RESULTS.md", "## Speculative decoding", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
