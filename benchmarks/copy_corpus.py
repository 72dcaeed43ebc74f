"""A corpus that teaches copying from the context, for measuring speculative decoding (issue 24).

Every function and method of the standard library's source, at most ``--max-chars`` long, becomes one
JSON-lines document: the function, a blank line, and the function again. A model trained on it learns
to go on with a passage it has seen earlier in its context (the shape of ``bench_spec.py``'s extractive
prompts) in minutes on a CPU. The modules ``bench_spec.py`` quotes (textwrap, shutil, json, argparse) are left out, so
the benchmark's passages are copied from the prompt, not recalled from training.

    python benchmarks/copy_corpus.py OUT.jsonl [--max-chars 900]
    nextoken train --data OUT.jsonl --preset quickstart --arch llama --mlp-act swiglu --no-qk-norm \
        --logit-softcap 0 --block-size 512 --max-corpus-chars 0 --max-time 1500 --out-dir runs/copy

(the llama family, so that ``--format gguf`` gives llama-server the same weights; 25 minutes on 2 cores gave
a model that reproduces 30% of a quoted function exactly and whose n-gram drafts are accepted 91% of the time).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
from pathlib import Path

QUOTED = {"textwrap.py", "shutil.py", "argparse.py"}


def documents(max_chars: int):
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if path.name in QUOTED or rel.parts[0] in {"json", "test", "site-packages", "idlelib", "lib2to3"}:
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
                body = lines[node.lineno - 1:node.end_lineno]
                while body and len("".join(body)) > max_chars:
                    body = body[:-1]
                if len(body) >= 3:
                    text = "".join(body)
                    yield text + "\n\n" + text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--max-chars", type=int, default=900)
    args = ap.parse_args(argv)
    n = chars = 0
    with args.out.open("w", encoding="utf-8") as f:
        for text in documents(args.max_chars):
            f.write(json.dumps({"text": text}) + "\n")
            n += 1
            chars += len(text)
    print(f"{args.out}: {n:,} documents, {chars:,} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
