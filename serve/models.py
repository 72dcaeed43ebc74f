"""Model versions inside the worker: the one serving new requests, the ones finishing, hot reload.

The server is started on a path: an artifact folder, or a models folder's ``current`` pointer
(a symlink, or a file naming the version folder beside it). About once a second, or at once
on ``POST /admin/reload``, the worker looks at where that path resolves and at its
manifest. When either changed, a loader thread reads the new version, checks every file's
hash, builds its engine and runs a warm-up generation, all beside the running version. Only
then do new requests go to it; requests already running finish on the version they started
on, which is freed as soon as it has none left. A version that fails any check is refused,
logged and counted, and the running one keeps serving; it is retried only once the path
changes again.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextoken.export.artifact import Artifact, ArtifactError, load_artifact
from nextoken.serve.core import GenerationCore, TokenEvent
from nextoken.serve.sampling import SamplingParams

logger = logging.getLogger("nextoken.serve")


def resolve_artifact_dir(path: str | Path) -> Path:
    """The real folder behind ``path`` (follows a ``current`` symlink or pointer file)."""
    p = Path(path)
    if p.is_file():  # a pointer file holding the version folder's name
        p = p.parent / p.read_text(encoding="utf-8").strip()
    return p.resolve()


def signature(path: str | Path) -> tuple[str, str]:
    """(resolved folder, sha256 of its manifest): changes whenever a different version is published."""
    folder = resolve_artifact_dir(path)
    try:
        digest = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        digest = ""
    return str(folder), digest


def warm_up(core: GenerationCore) -> None:
    """A short generation through the whole path; raises if the model cannot generate."""
    core.add("__warmup__", [core.eos_id], SamplingParams(temperature=0, max_tokens=2))
    events = []
    while core.has_work():
        events += core.step()
    if not events or events[-1].finish_reason is None:
        raise RuntimeError("warm-up generation did not finish")


@dataclass
class ModelInfo:
    id: str
    name: str
    version: str
    path: str


class ModelSet:
    def __init__(self, path: str, make_core: Callable[[Artifact], GenerationCore],
                 on_change: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.path = path
        self.make_core = make_core
        self.on_change = on_change or (lambda kind, info: None)
        self.current: GenerationCore | None = None
        self.current_sig: tuple[str, str] | None = None
        self.draining: list[GenerationCore] = []
        self.owner: dict[str, GenerationCore] = {}  # request id -> the core running it
        self._failed_sig: tuple[str, str] | None = None
        self._loader: threading.Thread | None = None
        self._loaded: tuple[tuple[str, str], GenerationCore | None, str | None] | None = None

    # --- loading -------------------------------------------------------------------------------
    def load_initial(self) -> None:
        sig = signature(self.path)
        core = self._build(sig)
        self.current, self.current_sig = core, sig
        self.on_change("loaded", self.info().__dict__)

    def _build(self, sig: tuple[str, str]) -> GenerationCore:
        artifact = load_artifact(sig[0])  # checks every file's sha256
        core = self.make_core(artifact)
        warm_up(core)
        return core

    def info(self) -> ModelInfo:
        a = self.current.artifact
        return ModelInfo(a.model_id, a.name, a.version, str(a.path))

    @property
    def models_loaded(self) -> int:
        return (self.current is not None) + len(self.draining)

    def poll(self, force: bool = False) -> None:
        """Start loading a new version if the path changed; apply a finished load."""
        if self._loaded is not None:
            self._apply()
        if self._loader is not None:
            return
        sig = signature(self.path)
        if sig == self.current_sig or (sig == self._failed_sig and not force):
            return
        self._loader = threading.Thread(target=self._load, args=(sig,), daemon=True, name="model-loader")
        self._loader.start()

    def _load(self, sig: tuple[str, str]) -> None:
        try:
            core = self._build(sig)
            self._loaded = (sig, core, None)
        except ArtifactError as e:
            self._loaded = (sig, None, f"invalid artifact: {e}")
        except Exception as e:  # any failure to build or warm up refuses the version
            self._loaded = (sig, None, f"failed warm-up: {type(e).__name__}: {e}")

    def _apply(self) -> None:
        sig, core, error = self._loaded
        self._loaded = None
        self._loader = None
        if core is None:
            self._failed_sig = sig
            logger.error("refusing the model at %s: %s; still serving %s", sig[0], error,
                         self.current.artifact.model_id)
            self.on_change("failed", {"path": sig[0], "reason": error.split(":")[0],
                                      "id": Path(sig[0]).name, "error": error})
            return
        old = self.current
        self.current, self.current_sig, self._failed_sig = core, sig, None
        if old.has_work():
            self.draining.append(old)
        logger.warning("now serving %s (was %s)", core.artifact.model_id, old.artifact.model_id)
        self.on_change("switched", self.info().__dict__)

    # --- requests ------------------------------------------------------------------------------
    def add(self, rid: str, payload: dict[str, Any]) -> None:
        core = self.current
        ids = payload["prompt_ids"]
        if payload.get("model") != core.artifact.model_id and payload.get("text") is not None:
            # The HTTP side tokenized with a version that is no longer (or not yet) the one serving:
            # tokenize again with the tokenizer of the version that will run it.
            ids = [core.eos_id] + core.tokenizer.encode(payload["text"], add_special_tokens=False).ids
        core.add(rid, ids, SamplingParams(**payload["params"]), payload["arrival"])
        self.owner[rid] = core

    def cancel(self, rid: str) -> None:
        core = self.owner.get(rid)
        if core is not None:
            core.cancel(rid)

    def abort_all(self) -> list[str]:
        """Drop every request on every version (after a failed step); returns their ids."""
        rids = [rid for core in [*self.draining, self.current] for rid in core.abort_all()]
        self.draining = []
        self.owner.clear()
        return rids

    def has_work(self) -> bool:
        return self.current.has_work() or any(c.has_work() for c in self.draining)

    def has_capacity(self) -> bool:
        return self.current.has_capacity()

    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        for core in [*self.draining, self.current]:
            if core.has_work():
                events += core.step()
        for ev in events:
            if ev.finish_reason is not None:
                self.owner.pop(ev.rid, None)
        if self.draining:
            before = len(self.draining)
            self.draining = [c for c in self.draining if c.has_work()]  # the rest are freed here
            if len(self.draining) != before:
                self.on_change("freed", {"models_loaded": self.models_loaded})
        return events
