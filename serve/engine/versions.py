"""Model versions inside the engine process: the one serving new requests, the ones finishing, hot reload.

The server is started on a path: an artifact folder, or a models folder's ``current`` pointer
(a symlink, or a file naming the version folder beside it). About once a second, or at once
on ``POST /admin/reload``, the engine looks at where that path resolves and at its manifest.
When either changed, a loader thread reads the new version, checks every file's hash, builds
its engine core and runs a warm-up generation, all beside the running version. Only then do new
requests go to it; requests already running finish on the version they started on, which is
freed as soon as it has none left. A version that fails any check is refused, logged and
counted, and the running one keeps serving; it is retried only once the path changes again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nextoken.export.artifact import Artifact, ArtifactError, load_artifact, resolve_artifact_dir
from nextoken.serve.engine.core import EngineCore
from nextoken.serve.tokens import ModelTokenizer
from nextoken.serve.wire import AddRequest, ModelEvent, SamplingParams, StepOutput

logger = logging.getLogger("nextoken.serve")


def signature(path: str | Path) -> tuple[str, str]:
    """(resolved folder, sha256 of its manifest): changes whenever a different version is published."""
    folder = resolve_artifact_dir(path)
    try:
        digest = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        digest = ""
    return str(folder), digest


def warm_up(core: EngineCore) -> None:
    """A short generation through the whole path; raises if the model cannot generate.

    It is not traffic, so it does not look up the prefix cache: nextoken_prefix_cache_queries_total and
    hits_total count clients' prompts only, as their usage reports them.
    """
    cache, core.scheduler.prefix_cache = core.scheduler.prefix_cache, None
    try:
        core.add(AddRequest("__warmup__", [core.eos_id], SamplingParams(temperature=0, max_tokens=2), 0.0,
                            core.model_id))
        finished = {}
        for _ in range(100):
            if not core.has_work():
                break
            finished.update(core.step().finished)
    finally:
        core.scheduler.prefix_cache = cache
    if "__warmup__" not in finished:
        raise RuntimeError("warm-up generation did not finish")


@dataclass
class Version:
    """One loaded model version: its core, and its tokenizer for the rare re-tokenization."""

    core: EngineCore
    artifact: Artifact
    _tokenizer: ModelTokenizer | None = None

    @property
    def id(self) -> str:
        return self.artifact.model_id

    def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """A text prompt as this version's tokenizer feeds it (the HTTP side's rule, ``encode_prompt``)."""
        if self._tokenizer is None:
            a = self.artifact
            self._tokenizer = ModelTokenizer.from_folder(a.path, a.config, a.generation_config)
        return self._tokenizer.encode_prompt(text, add_special_tokens)


@dataclass(frozen=True)
class VersionChange:
    """What happened to a model version (the engine loop turns it into metrics and a ModelStatus)."""

    event: ModelEvent
    id: str  # the version it is about (name:version)
    reason: str | None = None  # FAILED: one of metrics.RELOAD_FAILURE_REASONS
    error: str | None = None  # FAILED: the whole message


class ModelSet:
    def __init__(self, path: str, make_core: Callable[[Artifact], EngineCore],
                 on_change: Callable[[VersionChange], None] | None = None) -> None:
        self.path = path
        self.make_core = make_core
        self.on_change = on_change or (lambda change: None)
        self.current: Version | None = None
        self.current_sig: tuple[str, str] | None = None
        self.draining: list[Version] = []
        self.owner: dict[str, Version] = {}  # request id -> the version running it
        self._failed_sig: tuple[str, str] | None = None
        self._loader: threading.Thread | None = None
        self._loaded: tuple[tuple[str, str], Version | None, str | None] | None = None

    # --- loading -------------------------------------------------------------------------------
    def load_initial(self, verified: Artifact | None = None) -> None:
        """Load the version at the path (``verified``: the launcher already checked its hashes)."""
        sig = signature(self.path)
        self.current, self.current_sig = self._build(sig, verified), sig
        self.on_change(VersionChange(ModelEvent.LOADED, self.current.id))

    def _build(self, sig: tuple[str, str], verified: Artifact | None = None) -> Version:
        artifact = verified if verified is not None and str(verified.path.resolve()) == sig[0] else load_artifact(
            sig[0])  # checks every file's sha256
        core = self.make_core(artifact)
        warm_up(core)
        return Version(core, artifact)

    @property
    def versions(self) -> list[Version]:
        return [*self.draining, self.current]

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
            self._loaded = (sig, self._build(sig), None)
        except ArtifactError as e:
            self._loaded = (sig, None, f"invalid artifact: {e}")
        except Exception as e:  # any failure to build or warm up refuses the version
            self._loaded = (sig, None, f"failed warm-up: {type(e).__name__}: {e}")

    def _apply(self) -> None:
        sig, version, error = self._loaded
        self._loaded = None
        self._loader = None
        if version is None:
            self._failed_sig = sig
            logger.error("refusing the model at %s: %s; still serving %s", sig[0], error, self.current.id)
            self.on_change(VersionChange(ModelEvent.FAILED, self._refused_id(sig[0]), error.split(":")[0], error))
            return
        old = self.current
        self.current, self.current_sig, self._failed_sig = version, sig, None
        if old.core.has_work():
            self.draining.append(old)
        else:
            self.on_change(VersionChange(ModelEvent.FREED, old.id))
        logger.warning("now serving %s (was %s)", version.id, old.id)
        self.on_change(VersionChange(ModelEvent.SWITCHED, version.id))

    def _refused_id(self, folder: str) -> str:
        """The refused version as ``name:version`` (the label every metric uses), read from its manifest
        without trusting the rest; a folder without a readable one is this model's version of its name."""
        try:
            manifest = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
            return f"{manifest['name']}:{manifest['version']}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"{self.current.artifact.name}:{Path(folder).name}"

    # --- requests ------------------------------------------------------------------------------
    def add(self, req: AddRequest) -> None:
        """Queue ``req`` on the current version (raises ``RequestRejected`` if it cannot run it)."""
        v = self.current
        if req.model != v.id and req.prompt_text is not None:
            # The HTTP side tokenized with a version that is no longer (or not yet) the one serving:
            # tokenize again with the tokenizer of the version that will run it.
            req.prompt_ids = v.tokenize(req.prompt_text, req.add_special_tokens)
        v.core.add(req)
        self.owner[req.rid] = v

    def cancel(self, rid: str) -> None:
        v = self.owner.get(rid)
        if v is not None:
            v.core.cancel(rid)

    def abort_all(self) -> list[str]:
        """Drop every request on every version (after a failed step); returns their ids."""
        rids = [rid for v in self.versions for rid in v.core.abort_all()]
        self.owner.clear()
        return rids

    def has_work(self) -> bool:
        return any(v.core.has_work() for v in self.versions)

    def step(self) -> list[StepOutput]:
        outs = [v.core.step() for v in self.versions if v.core.has_work()]
        for out in outs:
            for rid in out.finished:
                self.owner.pop(rid, None)
        if self.draining:
            for v in [v for v in self.draining if not v.core.has_work()]:
                self.draining.remove(v)  # freed here: the last reference to its core and cache
                self.on_change(VersionChange(ModelEvent.FREED, v.id))
        return outs
