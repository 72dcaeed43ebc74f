"""The server's memory, planned before anything is loaded: weights, KV cache, prefix cache, and the refusal.

The KV cache is allocated whole at start-up (slots x length x layers x 2 x width x itemsize), so
its size is a promise the flags make. ``--kv-cache-mb`` bounds it: the cache then holds
``floor(MiB / bytes per token)`` tokens, split into ``--max-batch-size`` slots of up to the
model's context (fewer tokens per slot when it does not fit), or, with ``--max-model-len`` given,
into as many slots of that length as fit (at most ``--max-batch-size``). Without it the cache is
``--max-batch-size`` x ``--max-model-len`` (the model's context by default), as before.

A plan whose weights + caches do not fit the memory this process may still use (``MemAvailable``,
and a cgroup's ``memory.max`` less its usage) is refused before the model is loaded, naming the
flag that sized the cache. This module reads files and flags; it loads nothing.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nextoken.errors import UserError
from nextoken.serve.config import ServeConfig

MIB = 1 << 20
# Beyond weights and caches: the interpreter, ONNX Runtime's arenas and activations, the HTTP process,
# the tokenizer. Measured: the toy model's engine + HTTP processes hold ~250 MiB besides their caches.
OVERHEAD_BYTES = 256 * MIB


@dataclass(frozen=True)
class MemoryPlan:
    slots: int
    max_len: int
    token_bytes: int  # KV bytes one token takes in every layer
    weights_bytes: int  # serving.onnx on disk: what ONNX Runtime holds (prepacking may add a transient copy)
    prefix_cache_bytes: int
    flag: str  # the flag that sized the cache, for a refusal
    draft_bytes: int = 0  # --draft-model: its weights and its own KV cache (the same slots, up to its context)

    @property
    def kv_cache_bytes(self) -> int:
        return self.slots * self.max_len * self.token_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.prefix_cache_bytes + self.draft_bytes + OVERHEAD_BYTES

    def describe(self) -> str:
        return (f"weights {self.weights_bytes / MIB:,.1f} MiB, KV cache {self.kv_cache_bytes / MIB:,.1f} MiB "
                f"({self.slots} slots x {self.max_len} tokens), prefix cache {self.prefix_cache_bytes / MIB:,.1f} MiB"
                + (f", draft model {self.draft_bytes / MIB:,.1f} MiB" if self.draft_bytes else ""))


def with_draft(p: MemoryPlan, draft_config: dict[str, Any], draft_dir: Path) -> MemoryPlan:
    """``p`` with a draft model's weights and KV cache (one slot per target slot, up to the draft's context)."""
    length = min(p.max_len, int(draft_config["n_positions"]))
    return dataclasses.replace(p, draft_bytes=weights_bytes(draft_dir) + p.slots * length * token_bytes(draft_config))


def token_bytes(artifact_config: dict[str, Any]) -> int:
    c = artifact_config
    itemsize = 2 if c.get("torch_dtype") == "float16" else 4
    kv_heads = int(c.get("n_kv_head") or c["n_head"])  # grouped-query attention caches fewer heads
    return 2 * int(c["n_layer"]) * kv_heads * int(c["head_dim"]) * itemsize


def weights_bytes(artifact_dir: Path) -> int:
    return sum(p.stat().st_size for p in (artifact_dir / "serving.onnx", artifact_dir / "serving.onnx.data")
               if p.is_file())


def plan(config: ServeConfig, artifact_config: dict[str, Any], weights: int) -> MemoryPlan:
    """Slots and length from the flags (see the module note); raises UserError naming the flag."""
    context = int(artifact_config["n_positions"])
    per_token = token_bytes(artifact_config)
    prefix = config.prefix_cache_bytes
    if config.kv_cache_mb <= 0:
        return MemoryPlan(config.max_batch_size, config.max_model_len or context, per_token, weights, prefix,
                          "--max-batch-size")
    tokens = int(config.kv_cache_mb * MIB) // per_token
    if config.max_model_len:
        slots = min(config.max_batch_size, tokens // config.max_model_len)
        if slots < 1:
            raise UserError(f"{config.kv_cache_mb:g} MiB holds {tokens} tokens ({per_token:,} bytes each), fewer than "
                            f"one sequence of --max-model-len {config.max_model_len}", flag="--kv-cache-mb")
        return MemoryPlan(slots, config.max_model_len, per_token, weights, prefix, "--kv-cache-mb")
    length = min(context, tokens // config.max_batch_size)
    if length < 1:
        raise UserError(f"{config.kv_cache_mb:g} MiB holds {tokens} tokens ({per_token:,} bytes each), fewer than one "
                        f"per slot of --max-batch-size {config.max_batch_size}", flag="--kv-cache-mb")
    return MemoryPlan(config.max_batch_size, length, per_token, weights, prefix, "--kv-cache-mb")


def available_bytes() -> int | None:
    """Memory this process may still take: MemAvailable, and a cgroup v2 limit less its usage; None if unknown."""
    found: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_fits(p: MemoryPlan, available: int | None) -> None:
    """Refuse (naming the flag) a plan that needs more memory than is available."""
    if available is None or p.total_bytes <= available:
        return
    hint = ("lower --kv-cache-mb" if p.flag == "--kv-cache-mb"
            else "bound the cache with --kv-cache-mb, or lower --max-batch-size or --max-model-len")
    raise UserError(f"this configuration needs {p.total_bytes / MIB:,.0f} MiB ({p.describe()}, "
                    f"~{OVERHEAD_BYTES // MIB} MiB for the processes) but {available / MIB:,.0f} MiB is available; "
                    f"{hint}", flag=p.flag)


def apply(config: ServeConfig, p: MemoryPlan) -> ServeConfig:
    """The config the processes run with: the planned slots and length in place of the flags' bounds."""
    return dataclasses.replace(config, max_batch_size=p.slots, max_model_len=p.max_len)


def freeze_startup_heap() -> int:
    """Collect once, then move every object alive into the collector's permanent generation; returns how many.

    Why: a collection of the oldest generation walks every object the process holds. After start-up the
    HTTP process holds ~90k (FastAPI, pydantic, LitServe, the tokenizer's wrappers) and the engine ~50k;
    such a pass took 35-90 ms here and stalled every answer in flight: it was the tail of time-to-429
    under overload (benchmarks/bench_overload.py). What start-up built lives as long as the process, so
    the collector need not walk it again; garbage made later is still collected (vLLM and SGLang freeze
    their start-up heaps for the same reason).
    """
    gc.collect()
    before = gc.get_freeze_count()
    gc.freeze()
    return gc.get_freeze_count() - before
