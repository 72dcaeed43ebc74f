"""A Hugging Face folder served directly: ``nextoken serve HF_DIR`` exports it once into a cache.

``vllm serve DIR`` and ``llama-server -m FILE`` take a model as it comes; nextoken serves ONNX
artifacts, so the folder is exported first (``build.export_run``, with its parity check) into
``$NEXTOKEN_CACHE/served/<key>`` (default ``~/.cache/nextoken``). The key hashes every file of the
folder (names and contents) with the export's settings, so a changed weight file or tokenizer makes
a new export and an unchanged folder is exported once: later starts open the cached artifact after
checking its manifest's hashes. The export is written beside its final place and renamed in, so an
interrupted start leaves no half artifact to reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from nextoken.export.artifact import FORMAT, ArtifactError, load_artifact
from nextoken.fileio import sha256_file

CACHE_ENV = "NEXTOKEN_CACHE"


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder (config.json with a model_type), as opposed to a run folder (its config.json
    has "model") or an artifact (whose config.json transformers reads too, beside its manifest.json)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(cfg, dict) and "model_type" in cfg and "model" not in cfg
            and not (path / "manifest.json").is_file())


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/nextoken").expanduser()


def folder_key(folder: Path, settings: dict[str, str]) -> str:
    """sha256 over the folder's files (relative name + content hash, sorted) and the export settings."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, **settings}, sort_keys=True).encode())
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):  # .cache/, .git/ of a download
            h.update(f"{rel.as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def exported_folder(folder: str | Path, *, log: Callable[[str], None] | None = None) -> Path:
    """The artifact of Hugging Face folder ``folder``: from the cache, or exported into it now."""
    from nextoken.export.build import export_run  # torch: only when a folder is served this way

    folder = Path(folder).resolve()
    say = log or (lambda _msg: None)
    settings = {"dtype": "fp32", "quantize": "none"}
    out = cache_root() / "served" / folder_key(folder, settings)[:32]
    try:
        load_artifact(out, verify=True)
        say(f"serving {folder} from its export in {out}")
        return out
    except ArtifactError:
        pass  # not exported yet (or damaged): export again
    say(f"exporting {folder} into {out} (once: later starts reuse it) ...")
    return export_run(folder, out, name=folder.name, version="1", log=say)
