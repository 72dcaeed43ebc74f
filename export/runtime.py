"""The model runner: one ONNX Runtime session over ``serving.onnx`` and the KV cache it writes in place.

The runner knows nothing about requests, tokenizers or sampling: the caller names cache slots
(``0 .. max_slots-1``), each the cache of one sequence for its whole life, and the runner appends
tokens to them and returns logits.

NOTE on the cache: per layer, one key and one value buffer of shape (max_slots, n_kv_head, max_len,
head_dim), allocated once (n_kv_head = n_head but for grouped-query attention, where fewer key/value
heads each serve several query heads: config.json's ``n_kv_head``, absent in older artifacts).
``serving.onnx`` reads and writes them through IOBinding with the same
buffer bound as ``past`` and ``present``, so ONNX Runtime's GroupQueryAttention writes only the new
columns and reads each row's own length; nothing is ever copied or rebuilt when sequences join or
leave. A call covers a contiguous range of slots (``buffer[lo:hi]`` is one contiguous block, so it
binds without a copy): one slot for a prefill chunk, ``0 .. highest decoding slot`` for a decode
step. Slots in that range that are not decoding (free, or between prefill chunks) are fed one
padding token at their current length; the column it writes is past their last real token, so the
next real write overwrites it and no attention ever reads it.

On CUDA the buffers live on the device (OrtValues bound in place the same way); logits come back to
host memory, where the sampler reads them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from nextoken.export.artifact import Artifact, cache_names, eos_ids

SERVING_FILE = "serving.onnx"  # export/serving.py writes it; the Optimum-style model.onnx is for other runtimes


# NOTE(issue 22) on the default thread count. Measured (benchmarks/RESULTS.md, issue 22): on 2 physical
# cores the 91M-parameter model served ~1.3x faster with 2 ORT threads than with 1, and the HTTP process
# used 0.2-0.3 of a core at 32 streams, less than the thread it would have been given. Leaving it a whole
# core pays only from 5 cores on, where one core is a fifth of the compute or less. Hyperthread siblings
# share one core's arithmetic units: they are counted once.
RESERVE_FROM_CORES = 5  # from this many physical cores on, one is left to the HTTP process
# A server's small model gets one thread on up to 2 physical cores. Measured on 2 cores (bench_threads.py, 4
# interleaved runs, benchmarks/RESULTS.md): with 1 thread instead of 2, a 5.5 MB model served 1.18x / 1.36x
# faster at 1 / 32 streams and a 14 MB one 1.12x / 1.21x, while a 43 MB one was 1.18x faster at 1 stream but
# 0.86x at 32, and the 91M-parameter model (120-368 MB) 0.55-0.57x at 32. A second thread's share of so small
# a step is less than what it costs: the HTTP process, the client and the engine's own Python take a core from
# it in turn, and the call waits at each barrier (the call ran 2x slower in the server than in-process).
SMALL_MODEL_BYTES = 32 << 20  # serving-graph weights below this are "small"


def physical_cores() -> int:
    """Physical cores this process may run on: its CPU affinity with hyperthread siblings counted once,
    capped by a cgroup v2 CPU quota (a container's ``--cpus``)."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topo}/physical_package_id") as f, open(f"{topo}/core_id") as g:
                cores.add((f.read().strip(), g.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    n = max(1, len(cores))
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def default_threads(cores: int | None = None, *, weights_bytes: int | None = None) -> int:
    """ONNX Runtime intra-op threads when none are asked for: every physical core up to 4, one fewer from 5;
    for a server's model of under ``SMALL_MODEL_BYTES`` of weights (``weights_bytes``), one on up to 2 cores
    (see the notes above)."""
    n = physical_cores() if cores is None else cores
    if weights_bytes is not None and weights_bytes < SMALL_MODEL_BYTES and n <= 2:
        return 1
    return n - 1 if n >= RESERVE_FROM_CORES else n


def session_options(threads: int = 0, *, spin_between_calls: bool = True) -> ort.SessionOptions:
    """``spin_between_calls=False`` for a server's engine: its pool threads stop spinning as each call returns.

    Between a server's steps the HTTP process and the clients need the cores that ONNX Runtime's idle threads
    would spin on, and what they lose there a step's barriers lose again. Measured with 2 threads on 2 cores
    (bench_overhead.py, the 91M body, 1 stream, paired rounds): 1.14x as fast at int4 (9 of 10 rounds), 1.05x
    at int8 (6 of 8), the same at 32 streams (0.99x), with a fifth less engine CPU per token. In-process, with
    nothing else wanting the cores, waking the threads for each call costs 1-5% instead.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if not spin_between_calls:  # still spinning inside a call, between its operators
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


def providers_for(device: str) -> list:
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("--device cuda needs onnxruntime-gpu (pip install 'nextoken[gpu]')")
        return [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
    if device != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    return ["CPUExecutionProvider"]


@dataclass(frozen=True)
class CacheSpec:
    """The cache's shape and its memory, fixed for the runner's life (reported at start-up)."""

    max_slots: int
    max_len: int
    n_layer: int
    n_kv_head: int  # the cache's heads (grouped-query attention: fewer than the query heads)
    head_dim: int
    itemsize: int

    @property
    def nbytes(self) -> int:
        return 2 * self.n_layer * self.max_slots * self.n_kv_head * self.max_len * self.head_dim * self.itemsize

    @property
    def tokens(self) -> int:
        """Token capacity of the whole cache (slots x length)."""
        return self.max_slots * self.max_len


class Runner:
    """Prefill chunks and batched decode steps over slot-addressed, in-place KV caches."""

    def __init__(self, artifact: Artifact, *, max_slots: int, max_len: int | None = None, device: str = "cpu",
                 threads: int = 0, spin_between_calls: bool = True) -> None:
        cfg = artifact.config
        self.n_layer = int(cfg["n_layer"])
        self.n_head = int(cfg["n_head"])
        self.n_kv_head = int(cfg.get("n_kv_head") or self.n_head)  # the cache's heads
        self.head_dim = int(cfg["head_dim"])
        self.vocab_size = int(cfg["vocab_size"])
        self.context = int(cfg["n_positions"])
        pad = cfg.get("pad_token_id")
        self.pad_id = int(pad) if pad is not None else eos_ids(cfg)[0]
        max_len = self.context if max_len is None else max_len
        if not 1 <= max_len <= self.context:
            raise ValueError(f"max_len must be in [1, {self.context}] (the model's context), got {max_len}")
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        self.device = device
        path = artifact.path / SERVING_FILE
        if not path.is_file():
            raise ValueError(f"{artifact.path} has no serving graph ({SERVING_FILE}); export it again with this "
                             "nextoken (`nextoken export RUN --out ...`)")
        self.threads = threads or default_threads()  # ONNX Runtime's intra-op threads (shown at start-up)
        self.session = ort.InferenceSession(str(path), session_options(self.threads,
                                                                       spin_between_calls=spin_between_calls),
                                            providers=providers_for(device))
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            # ORT falls back to the CPU silently when the CUDA provider cannot load (driver, cuDNN).
            raise RuntimeError(f"--device cuda: ONNX Runtime could not start the CUDA provider (running on "
                               f"{self.provider}); check the CUDA and cuDNN libraries onnxruntime-gpu needs")
        kv_type = next(i.type for i in self.session.get_inputs() if i.name.startswith("past_key_values"))
        self.kv_dtype = np.float16 if "float16" in kv_type else np.float32
        self.spec = CacheSpec(max_slots, max_len, self.n_layer, self.n_kv_head, self.head_dim,
                              np.dtype(self.kv_dtype).itemsize)
        self.past_names = cache_names("past_key_values", self.n_layer)
        self.present_names = cache_names("present", self.n_layer)
        shape = (max_slots, self.n_kv_head, max_len, self.head_dim)
        # each (max_slots, n_kv_head, max_len, hs); host arrays on CPU, device OrtValues on CUDA
        self._row_bytes = self.n_kv_head * max_len * self.head_dim * self.spec.itemsize  # one slot of one buffer
        if device == "cuda":
            self.device_cache = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, "cuda", 0)
                                 for _ in self.past_names]
            self._cache_ptrs = [v.data_ptr() for v in self.device_cache]
        else:
            self.host_cache = [np.zeros(shape, dtype=self.kv_dtype) for _ in self.past_names]
            self._cache_ptrs = [buf.ctypes.data for buf in self.host_cache]
        # Reused step inputs, sized for the largest decode call: no allocation per step.
        self._ids = np.full((max_slots, 1), self.pad_id, dtype=np.int64)
        self._pos = np.zeros((max_slots, 1), dtype=np.int64)
        self._seqlens = np.zeros(max_slots, dtype=np.int32)
        self._total = np.zeros((), dtype=np.int32)
        self._logits = np.empty((max_slots, 1, self.vocab_size), dtype=np.float32)
        # Decode bindings, one per call width (slots 0 .. hi-1), made once: every buffer they point at is
        # one of the persistent arrays above, so a step only writes inputs and runs (binding through
        # ORT's Python API cost ~0.1 ms a call at 17 tensors).
        self._decode_bindings: dict[int, ort.IOBinding] = {}
        # One-slot prefill bindings (a later prompt chunk, a verification row, a draft model's call), one per
        # slot with its cache bound once: a call rebinds only its five small arrays (~0.1 ms less a call).
        self._slot_bindings: dict[int, ort.IOBinding] = {}

    # --- binding -------------------------------------------------------------------------------
    def _bind_cache(self, binding: ort.IOBinding, lo: int, hi: int) -> None:
        """Bind cache rows [lo, hi) of every buffer as both past and present: a pointer, no copy."""
        shape = [hi - lo, self.n_kv_head, self.spec.max_len, self.head_dim]
        offset = lo * self._row_bytes
        where = "cuda" if self.device == "cuda" else "cpu"
        for past, present, base in zip(self.past_names, self.present_names, self._cache_ptrs, strict=True):
            binding.bind_input(past, where, 0, self.kv_dtype, shape, base + offset)
            binding.bind_output(present, where, 0, self.kv_dtype, shape, base + offset)

    def _binding(self, lo: int, hi: int, ids: np.ndarray, pos: np.ndarray, seqlens: np.ndarray, total: np.ndarray,
                 logits_out: np.ndarray, binding: ort.IOBinding | None = None) -> ort.IOBinding:
        """Bind every input and output by pointer: the binding reads whatever those arrays hold at run time.
        Given ``binding`` (its cache rows [lo, hi) already bound), only the inputs and the logits are rebound."""
        if binding is None:
            binding = self.session.io_binding()
            self._bind_cache(binding, lo, hi)
        for name, arr in (("input_ids", ids), ("position_ids", pos), ("seqlens_k", seqlens),
                          ("total_sequence_length", total)):
            assert arr.flags.c_contiguous, name
            binding.bind_input(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits_out.shape), logits_out.ctypes.data)
        return binding

    # --- calls ---------------------------------------------------------------------------------
    def prefill(self, slot: int, token_ids: np.ndarray | list[int], start: int) -> np.ndarray:
        """Append ``token_ids`` (T,) to ``slot``'s cache at positions start .. start+T-1.

        Returns the logits (T, V) after each of those tokens.
        """
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)  # (1, T)
        T = ids.shape[1]
        if T < 1 or start < 0 or start + T > self.spec.max_len:
            raise ValueError(f"cannot place {T} tokens at {start} in a cache of {self.spec.max_len}")
        pos = np.arange(start, start + T, dtype=np.int64)[None]  # (1, T)
        seqlens = np.array([start + T - 1], dtype=np.int32)  # (1,)
        total = np.array(start + T, dtype=np.int32)  # ()
        logits = np.empty((1, T, self.vocab_size), dtype=np.float32)  # (1, T, V)
        held = self._slot_bindings.get(slot)
        binding = self._binding(slot, slot + 1, ids, pos, seqlens, total, logits, held)
        if held is None:
            self._slot_bindings[slot] = binding
        self.session.run_with_iobinding(binding)
        return logits[0]  # (T, V)

    def prefill_first(self, slots: list[int], chunks: list[list[int]], lengths: np.ndarray) -> np.ndarray:
        """Write ``chunks[i]`` at positions 0.. of ``slots[i]``, every chunk in ONE call; logits (n, T, V).

        Only first chunks batch: ONNX Runtime's GroupQueryAttention takes several rows of more than one
        token only when none has a past ("batch_size must be 1 when sequence_length > 1 and past context
        is given"), so a later chunk goes alone through ``prefill``. T is the longest chunk; a shorter
        one is padded on the right (its padding columns lie past its last real token: overwritten later,
        never read). The call covers slots min..max, and every slot in that range without a chunk must be
        empty (``lengths[slot] == 0``): it is fed T padding tokens at 0. Row i of the result holds chunk
        i's logits in its first ``len(chunks[i])`` positions.
        """
        lo, hi = min(slots), max(slots) + 1
        T = max(len(c) for c in chunks)
        if self.spec.max_len < T:
            raise ValueError(f"cannot place {T} tokens in a cache of {self.spec.max_len}")
        ids = np.full((hi - lo, T), self.pad_id, dtype=np.int64)  # (rows, T)
        busy = lengths[lo:hi] > 0
        for s, chunk in zip(slots, chunks, strict=True):
            ids[s - lo, :len(chunk)] = chunk
            busy[s - lo] = False
        if busy.any():
            raise ValueError(f"slots {lo}..{hi - 1} hold other sequences: {(np.flatnonzero(busy) + lo).tolist()}")
        pos = np.broadcast_to(np.arange(T, dtype=np.int64), (hi - lo, T)).copy()  # (rows, T)
        seqlens = np.full(hi - lo, T - 1, dtype=np.int32)  # (rows,)
        total = np.array(T, dtype=np.int32)  # (): = sequence_length, the kernel's "first prompt" case
        logits = np.empty((hi - lo, T, self.vocab_size), dtype=np.float32)  # (rows, T, V)
        self.session.run_with_iobinding(self._binding(lo, hi, ids, pos, seqlens, total, logits))
        return logits[np.asarray(slots) - lo]  # (n, T, V)

    def decode(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray,
               lengths: np.ndarray | None = None) -> np.ndarray:
        """Append one token per slot: tokens[i] at positions[i] of slots[i]; returns logits (n, V).

        ``lengths`` (max_slots,) holds every slot's current token count, so rows in the call's range
        that are not decoding write their padding column past their own tokens (see the module note);
        without it they write at 0, which is right only for free slots.
        """
        hi = int(slots.max()) + 1
        ids, pos, seqlens = self._ids[:hi], self._pos[:hi], self._seqlens[:hi]
        if lengths is not None:
            idle = np.minimum(lengths[:hi], self.spec.max_len - 1)
            pos[:, 0] = idle
            seqlens[:] = idle
        else:
            pos.fill(0)
            seqlens.fill(0)
        ids.fill(self.pad_id)
        ids[slots, 0] = tokens
        pos[slots, 0] = positions
        seqlens[slots] = positions
        self._total[()] = int(seqlens.max()) + 1
        binding = self._decode_bindings.get(hi)
        if binding is None:
            binding = self._decode_bindings[hi] = self._binding(0, hi, ids, pos, seqlens, self._total,
                                                                self._logits[:hi])
        self.session.run_with_iobinding(binding)
        return self._logits[slots, 0]  # (n, V)

    # --- cache contents (prefix caching) ---------------------------------------------------------
    # Prefix caching copies K/V between slots and a host-side store; on CUDA that would be a
    # device-host round trip per block, so the engine refuses a prefix cache there (ServeConfig).
    def read_kv(self, slot: int, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Slot's K/V at positions [start, stop) as one array (n_layer * 2, n_kv_head, stop-start, hs)."""
        if out is None:
            out = np.empty((len(self.host_cache), self.n_kv_head, stop - start, self.head_dim), dtype=self.kv_dtype)
        for i, buf in enumerate(self.host_cache):
            out[i] = buf[slot, :, start:stop]
        return out

    def write_kv(self, slot: int, start: int, kv: np.ndarray) -> None:
        """Put ``kv`` (n_layer * 2, n_kv_head, n, hs), as ``read_kv`` returns it, at positions start.. of slot."""
        n = kv.shape[2]
        for buf, part in zip(self.host_cache, kv, strict=True):
            buf[slot, :, start:start + n] = part
