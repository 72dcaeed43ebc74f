"""What ``--data`` names: files, folders and globs expanded to the files they hold, in a stable order.

Torch-free: ``nextoken eval`` expands its ``--data`` here too, on a serving-only install. This
module reads directory listings only, never the files' contents (``data`` does).
"""

from __future__ import annotations

import glob
import sysconfig
from collections.abc import Collection
from pathlib import Path

from nextoken.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".tex", ".html", ".c", ".h", ".js", ".ts",
                 ".rs", ".go", ".java", ".toml", ".yaml", ".yml", ".ini", ".cfg", ""}


def default_corpus_files() -> list[Path]:
    """The standard library's ``.py`` files, tests and third-party packages left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    return sorted(files)


def expand_paths(specs: list[str], suffixes: Collection[str] | None = None) -> list[Path]:
    """Files, folders (their files, recursively, sorted; hidden ones skipped) and globs, in order, as ``--data``.

    ``suffixes``: the only files a folder contributes (None: all); a file named or globbed is taken as it is.
    """
    what = "text files" if suffixes else "files"
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and (suffixes is None or f.suffix.lower() in suffixes)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise UserError(f"folder {spec!r} holds no {what}", flag="--data")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        elif any(c in spec for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
            if not found:
                raise UserError(f"pattern {spec!r} matches no files", flag="--data")
            out.extend(found)
        else:
            raise UserError(f"{spec!r} does not exist", flag="--data")
    return out


def resolve_sources(data: list[str]) -> list[Path]:
    """Expand files, folders and globs into a sorted, de-duplicated list of files."""
    if not data:
        files = default_corpus_files()
        if not files:
            raise UserError("the built-in corpus (the Python standard library's source) was not found; "
                            "pass text files", flag="--data")
        return files
    seen: set[Path] = set()
    unique = []
    for f in expand_paths(data, TEXT_SUFFIXES):
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique
