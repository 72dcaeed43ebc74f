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
        [--text CORPUS] [--cases extract,sample,streams32,text] [--llama-server BIN --gguf G [--draft-gguf D]]

With ``--draft`` a third server, ``--speculative draft --draft-model DRAFT_ARTIFACT``, runs every case too.
``--text CORPUS`` adds the case ``text``: 1 stream, greedy continuations of passages from the corpus's held-out
last 10% (what a draft model trained on the same corpus is for; pick cases with ``--cases``).
``--llama-server BIN --gguf TARGET.gguf [--draft-gguf DRAFT.gguf]`` (GGUFs from ``nextoken export RUN --format
gguf --dtype f32``) adds llama.cpp's server in the same modes: ``--spec-type ngram-simple`` (lookup
``--llama-ngram`` tokens, draft ``--k``) and ``draft-simple`` (``--spec-draft-n-max`` = ``--k``), in the same
interleaved rounds, and a side-by-side table.

A random-weight model never accepts a draft: measure on a trained model that copies (``copy_corpus.py``
and the command in its docstring), and look at the reproduced share and the ``extract`` acceptance before
reading the speed-up.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import NextokenServer, uptime, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEC = ("drafts", "draft_tokens", "accepted_tokens")


def passages(tokenize, budget: int, n: int) -> list[tuple[str, str]]:
    """``n`` extractive prompts of at most ``budget`` tokens (a standard-library function, then its first line
    again, without its newline), each with the rest of the function: what a model that copies goes on with."""
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
            # The prompt stops before the first line's newline: byte-level BPE merges a newline with the next
            # line's indentation, so a prompt ending in a bare newline token is one no model saw in training.
            text, first = "".join(lines), lines[0].rstrip("\n")
            out.append((text + "\n\n" + first, text[len(first):]))
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


async def run_case(url: str, bodies: list[dict], streams: int) -> tuple[float, list[str], list[float]]:
    """Every body once per stream (streams x len(bodies) requests): output tok/s, the first stream's texts, and
    (drafts, draft tokens, accepted) summed from llama-server's per-response ``timings`` (zeros from nextoken,
    whose counters are read from /metrics instead)."""
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    drafted = [0.0, 0.0, 0.0]
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker() -> list[tuple[int, str]]:
            done = []
            for body in bodies:
                r = await client.post(url + "/v1/completions", json=body)
                r.raise_for_status()
                msg = r.json()
                done.append((msg["usage"]["completion_tokens"], msg["choices"][0]["text"]))
                timings = msg.get("timings") or {}
                if timings.get("draft_n"):
                    drafted[0] += 1
                    drafted[1] += timings["draft_n"]
                    drafted[2] += timings.get("draft_n_accepted", 0)
            return done

        t0 = time.perf_counter()
        results = await asyncio.gather(*[worker() for _ in range(streams)])
        wall = time.perf_counter() - t0
    tokens = sum(n for rs in results for n, _ in rs)
    return tokens / wall, [x for _n, x in results[0]], drafted


def med(v: list[float], fmt: str = "{:,.1f}") -> str:
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def servers_for(args: argparse.Namespace, art: Path) -> dict[str, object]:
    """name -> a started server: ``nextoken off|ngram[|draft]``, and with ``--llama-server`` the same modes of
    llama-server on the GGUF of the same weights (its ``ngram-simple`` and ``draft-simple``)."""
    from llama_peer import LlamaServer, find_binary

    threads = ["--threads", str(args.threads)] if args.threads else []
    k = ["--num-speculative-tokens", str(args.k)]
    flags = {"off": [], "ngram": ["--speculative", "ngram", *k]}
    if args.draft:
        flags["draft"] = ["--speculative", "draft", "--draft-model", str(args.draft), *k]
    servers: dict[str, object] = {}
    try:
        for name, f in flags.items():
            servers[f"nextoken {name}"] = NextokenServer(art, "--max-batch-size", "32", *threads, *f)
        binary = find_binary(args.llama_server)
        if binary:
            if not args.gguf:
                raise SystemExit("--llama-server needs --gguf (`nextoken export RUN --format gguf --dtype f32`)")
            ctx = int(json.loads((art / "config.json").read_text())["n_positions"])
            n = ["--spec-draft-n-max", str(args.k)]
            peer = {"off": [], "ngram": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n",
                                         str(args.llama_ngram), "--spec-ngram-simple-size-m", str(args.k), *n]}
            if args.draft:
                if not args.draft_gguf:
                    raise SystemExit("--draft with --llama-server needs --draft-gguf")
                peer["draft"] = ["--spec-type", "draft-simple", "--model-draft", str(args.draft_gguf), *n]
            for name, extra in peer.items():
                servers[f"llama {name}"] = LlamaServer(binary, args.gguf, parallel=32, ctx=32 * ctx,
                                                       threads=args.threads or os.cpu_count() or 1, extra=extra)
    except BaseException:
        for s in servers.values():
            s.stop()
        raise
    return servers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96, help="max_tokens per request")
    ap.add_argument("--prompts", type=int, default=3, help="extractive prompts per run")
    ap.add_argument("--k", type=int, default=8, help="--num-speculative-tokens (llama-server: --spec-draft-n-max)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--draft", type=Path, help="a draft artifact (same tokenizer): also serve --speculative draft")
    ap.add_argument("--llama-server", default=None, help="also run llama-server (default: $NEXTOKEN_LLAMA_SERVER)")
    ap.add_argument("--gguf", type=Path, help="the target's GGUF for llama-server")
    ap.add_argument("--draft-gguf", type=Path, help="the draft's GGUF for llama-server")
    ap.add_argument("--llama-ngram", type=int, default=3, help="llama-server's --spec-ngram-simple-size-n")
    ap.add_argument("--cases", default="extract,sample,streams32",
                    help="comma-separated: extract, sample, streams32, text (needs --text)")
    ap.add_argument("--text", type=Path, help="a corpus whose held-out last 10%% gives the `text` case's prompts")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)

    from tokenizers import Tokenizer

    art = args.artifact
    cfg = json.loads((art / "config.json").read_text())
    ctx = int(cfg["n_positions"])
    tok = Tokenizer.from_file(str(art / "tokenizer.json"))
    tokenize = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    texts = passages(tokenize, ctx - args.tokens - 8, args.prompts)
    if not texts and "extract" in args.cases:
        raise SystemExit(f"no passage fits a {ctx}-token context with {args.tokens} tokens to generate")
    greedy = [{"prompt": t, "max_tokens": args.tokens, "temperature": 0} for t, _rest in texts]
    import textwrap

    start = inspect.getsource(textwrap)[:300]
    sample = [{"prompt": start[:120 + 40 * i], "max_tokens": args.tokens, "temperature": 1.0, "seed": i,
               "ignore_eos": True} for i in range(args.prompts)]
    every = {"extract": (greedy, 1), "sample": (sample, 1), "streams32": (greedy, 32)}
    if args.text:  # greedy continuations of passages from the held-out end of a corpus (what a draft is for)
        corpus = args.text.read_text(encoding="utf-8")
        held_out = corpus[int(len(corpus) * 0.9):]
        starts = [i + 1 for i, ch in enumerate(held_out[:-400]) if ch == "\n" and held_out[i - 1] == "\n"]
        picks = starts[::max(1, len(starts) // args.prompts)][:args.prompts]
        prompts = [held_out[i:i + 200] for i in picks]
        for j, text in enumerate(prompts):
            while len(tokenize(text)) > ctx - args.tokens - 8:  # drop from the start: the context must hold it all
                text = text[10:]
            prompts[j] = text
        every["text"] = ([{"prompt": text, "max_tokens": args.tokens, "temperature": 0, "ignore_eos": True}
                          for text in prompts], 1)
    cases = {c: every[c] for c in args.cases.split(",")}
    servers = servers_for(args, art)
    names = list(servers)
    spec_names = [n for n in names if not n.endswith(" off")]
    res: dict[str, dict[str, list]] = {c: {k: [] for n in names for k in (n, n + ":acc", n + ":same", n + ":drafts")}
                                       for c in cases}
    copied: list[float] = []
    try:
        for s in servers.values():  # a first request pays for lazy set-up: not measured
            asyncio.run(run_case(s.url, next(iter(cases.values()))[0][:1], 1))
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for case, (bodies, streams) in cases.items():
                texts_of = {}
                for name in order:
                    url = servers[name].url
                    before = spec_counts(url) if name.startswith("nextoken") else [0.0] * 3
                    tps, texts_of[name], timed = asyncio.run(run_case(url, bodies, streams))
                    after = spec_counts(url) if name.startswith("nextoken") else timed
                    res[case][name].append(tps)
                    d = [b - a for a, b in zip(before, after, strict=True)]
                    res[case][f"{name}:acc"].append(d[2] / d[1] if d[1] else 0.0)
                    res[case][f"{name}:drafts"].append(d[0])
                if case == "extract":  # how much of each passage the model's greedy output reproduces
                    share = [len(os.path.commonprefix([out, rest])) / len(rest)
                             for out, (_p, rest) in zip(texts_of["nextoken off"], texts, strict=True)]
                    copied.append(sum(share) / len(share))
                line = [f"round {rnd + 1} {case}:"]
                for name in names:
                    base = name.split()[0] + " off"
                    res[case][f"{name}:same"].append(texts_of[base] == texts_of[name])
                    line.append(f"{name} {res[case][name][-1]:.1f} tok/s (acc {res[case][name + ':acc'][-1]:.2f}, "
                                f"same {res[case][name + ':same'][-1]})")
                print(" ".join(line), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    load = uptime()
    rows = ["| case | streams | server | tok/s off | speculative | tok/s | ratio | acceptance | drafts | same output |",
            "|---|--:|---|--:|---|--:|--:|--:|--:|---|"]
    for case, (_bodies, streams) in cases.items():
        r = res[case]
        for name in spec_names:
            who, mode = name.split()
            off = r[f"{who} off"]
            ratios = [b / a for a, b in zip(off, r[name], strict=True)]
            rows.append(f"| {case} | {streams} | {who} | {med(off)} | {mode} | {med(r[name])} | "
                        f"**{med(ratios, '{:.2f}')}** | {med(r[name + ':acc'], '{:.2f}')} | "
                        f"{int(sum(r[name + ':drafts']))} | {all(r[name + ':same'])} |")
    side = []
    if any(n.startswith("llama") for n in names):
        side = ["", "Side by side (nextoken tok/s / llama-server tok/s, same mode, same round):", "",
                "| case | streams | mode | nextoken / llama-server |", "|---|--:|---|--:|"]
        for case, (_bodies, streams) in cases.items():
            for mode in ("off", "ngram", "draft"):
                a, b = res[case].get(f"nextoken {mode}"), res[case].get(f"llama {mode}")
                if a and b:
                    side.append(f"| {case} | {streams} | {mode} | "
                                f"**{med([x / y for x, y in zip(a, b, strict=True)], '{:.2f}')}** |")
    extra = (f" --draft {args.draft.name}" if args.draft else "") + (" --llama-server ..." if side else "")
    body = [f"`python benchmarks/bench_spec.py {art.name}{extra} --rounds {args.rounds} --tokens {args.tokens} "
            f"--prompts {args.prompts} --k {args.k}` ({cfg['n_layer']} layers, {cfg['n_embd']} wide, context {ctx}, "
            f"vocab {cfg['vocab_size']}); `uptime` at the end: {load}", ""]
    if copied:
        body += [f"Greedy output without speculation reproduces {statistics.mean(copied):.0%} of the quoted passages "
                 "(characters of each passage's rest matched from the start, mean over the prompts and rounds).", ""]
    body += [*rows, *side]
    print("\n".join(body))
    if args.write_results:
        write_results(REPO / "benchmarks" / "RESULTS.md", "## Speculative decoding", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
