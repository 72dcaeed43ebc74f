"""The engine: one ONNX Runtime session and the KV caches of every running sequence.

The engine knows nothing about HTTP, tokenizers or sampling: it turns prompts into logits and
advances the whole batch one token per ``decode`` call.

NOTE on the cache layout: all running sequences share one set of cache arrays, each
(B, n_head, P, head_dim), and one (B, P) attention mask over cache slots. Rows are
right-aligned: a row that joined while others were longer starts with masked "hole" slots,
exactly like left padding, and per-row ``position_ids`` keep every row's positions its own.
So a decode step is a single ``session.run`` for the whole batch, whatever each row's length;
the graph appends one slot to every row (``present = concat(past, new)``). Membership changes
(a prefill joining, a sequence leaving) rebuild the arrays once; columns that are holes in
every row are trimmed then, and a row whose holes grow past its real length is compacted.

On CUDA the caches stay on the device between steps through IOBinding (OrtValues); they come
back to host memory only when the batch's membership changes.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from nextoken.export.artifact import Artifact


def default_threads() -> int:
    # Leave a core to the HTTP process: with every core busy in ORT's spinning pool, the API process and
    # the engine fight and steps stall (field notes: 2 threads beside a busy neighbour went from 1.7 to 95 ms).
    return max(1, min(4, (os.cpu_count() or 1) - 1))


def make_session(artifact: Artifact, device: str = "cpu", threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("--device cuda needs onnxruntime-gpu (pip install 'nextoken[gpu]')")
        providers = [("CUDAExecutionProvider", {}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(str(artifact.onnx_path), opts, providers=providers)


class Engine:
    """Batched prefill and decode over one artifact; rows are identified by request ids."""

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int = 0) -> None:
        cfg = artifact.config
        self.artifact = artifact
        self.device = device
        self.n_layer = int(cfg["n_layer"])
        self.n_head = int(cfg["n_head"])
        self.head_dim = int(cfg["head_dim"])
        self.vocab_size = int(cfg["vocab_size"])
        self.context = int(cfg["n_positions"])
        self.pad_id = int(cfg.get("pad_token_id", cfg["eos_token_id"]))
        self.session = make_session(artifact, device, threads)
        self.provider = self.session.get_providers()[0]
        if device == "cuda" and self.provider != "CUDAExecutionProvider":
            # ORT falls back to the CPU silently when the CUDA provider cannot load (driver, cuDNN):
            # serving would then fail on the first device copy instead of saying why here.
            raise RuntimeError(f"--device cuda: ONNX Runtime could not start the CUDA provider (running on "
                               f"{self.provider}); check the CUDA and cuDNN libraries onnxruntime-gpu needs")
        kv_type = next(i.type for i in self.session.get_inputs() if i.name.startswith("past_key_values"))
        self.kv_dtype = np.float16 if "float16" in kv_type else np.float32
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(self.n_layer) for kv in ("key", "value")]
        self.output_names = ["logits", *self.present_names]
        self.rids: list[str] = []  # row order of the batch
        self.mask = np.zeros((0, 0), dtype=np.int64)  # (B, P) 1 = real slot
        self.pos = np.zeros(0, dtype=np.int64)  # (B,) next position id of each row
        self.cache: list = [self._empty(0) for _ in self.past_names]  # each (B, nh, P, hs)

    # --- helpers -----------------------------------------------------------------------------
    def _empty(self, batch: int, slots: int = 0) -> np.ndarray:
        return np.zeros((batch, self.n_head, slots, self.head_dim), dtype=self.kv_dtype)

    @property
    def on_device(self) -> bool:
        return self.device == "cuda"

    def _host_cache(self) -> list[np.ndarray]:
        return [c.numpy() if isinstance(c, ort.OrtValue) else c for c in self.cache]

    def _set_cache(self, arrays: list[np.ndarray]) -> None:
        if self.on_device:
            self.cache = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", 0) for a in arrays]
        else:
            self.cache = arrays

    def _run(self, feeds: dict[str, np.ndarray], past: list) -> tuple[np.ndarray, list]:
        if not self.on_device:
            outs = self.session.run(self.output_names, {**feeds, **dict(zip(self.past_names, past, strict=True))})
            return outs[0], outs[1:]
        binding = self.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        for name, val in zip(self.past_names, past, strict=True):
            if isinstance(val, np.ndarray):
                val = ort.OrtValue.ortvalue_from_numpy(val, "cuda", 0)
            binding.bind_ortvalue_input(name, val)
        binding.bind_output("logits", "cpu")  # the sampler reads logits on the host
        for name in self.present_names:
            binding.bind_output(name, "cuda")  # the cache never leaves the device between steps
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy(), list(outs[1:])

    @property
    def batch_size(self) -> int:
        return len(self.rids)

    @property
    def slots(self) -> int:
        return int(self.mask.shape[1])

    # --- membership --------------------------------------------------------------------------
    def prefill(self, rids: list[str], prompts: list[list[int]]) -> np.ndarray:
        """Encode new prompts (one left-padded run) and add them to the batch.

        Returns the logits (n, V) after each prompt's last token.
        """
        n = len(prompts)
        width = max(len(p) for p in prompts)
        ids = np.full((n, width), self.pad_id, dtype=np.int64)  # (n, T)
        mask = np.zeros((n, width), dtype=np.int64)  # (n, T)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # (n, T)
        logits, presents = self._run({"input_ids": ids, "attention_mask": mask, "position_ids": pos},
                                     [self._empty(n) for _ in self.past_names])
        new_cache = [p.numpy() if isinstance(p, ort.OrtValue) else p for p in presents]  # each (n, nh, T, hs)
        self._merge(rids, new_cache, mask, np.array([len(p) for p in prompts], dtype=np.int64))
        return logits[:, -1, :]  # (n, V)

    def _merge(self, rids: list[str], cache: list[np.ndarray], mask: np.ndarray, pos: np.ndarray) -> None:
        if not self.rids:
            self.rids, self.mask, self.pos = list(rids), mask, pos
            self._set_cache(cache)
            return
        old = self._host_cache()
        P = max(self.slots, mask.shape[1])

        def left_pad(a: np.ndarray, width: int, axis: int) -> np.ndarray:
            extra = width - a.shape[axis]
            if extra == 0:
                return a
            pad = [(0, 0)] * a.ndim
            pad[axis] = (extra, 0)
            return np.pad(a, pad)

        merged = [np.concatenate([left_pad(a, P, 2), left_pad(b, P, 2)], axis=0) for a, b in zip(old, cache,
                                                                                                  strict=True)]
        self.mask = np.concatenate([left_pad(self.mask, P, 1), left_pad(mask, P, 1)], axis=0)
        self.pos = np.concatenate([self.pos, pos])
        self.rids = self.rids + list(rids)
        self._set_cache(merged)

    def release(self, rids: set[str] | list[str]) -> None:
        """Drop finished or cancelled rows; their cache slots are freed at once."""
        gone = set(rids)
        keep = [i for i, r in enumerate(self.rids) if r not in gone]
        if len(keep) == len(self.rids):
            return
        if not keep:
            self.rids, self.mask, self.pos = [], np.zeros((0, 0), dtype=np.int64), np.zeros(0, dtype=np.int64)
            self.cache = [self._empty(0) for _ in self.past_names]
            return
        idx = np.asarray(keep)
        mask = self.mask[idx]
        first = int(np.argmax(mask.any(axis=0)))  # columns before this are holes in every remaining row
        self.mask = np.ascontiguousarray(mask[:, first:])
        self.pos = self.pos[idx]
        self.rids = [self.rids[i] for i in keep]
        self._set_cache([np.ascontiguousarray(c[idx][:, :, first:]) for c in self._host_cache()])
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        """Re-pack rows right-aligned when holes outgrow the real tokens (rare; bounded cache)."""
        real = self.mask.sum(axis=1)
        width = int(real.max())
        if self.slots <= 2 * width + 64:
            return
        host = self._host_cache()
        packed = [self._empty(self.batch_size, width) for _ in host]
        mask = np.zeros((self.batch_size, width), dtype=np.int64)
        for b in range(self.batch_size):
            cols = np.flatnonzero(self.mask[b])
            for dst, src in zip(packed, host, strict=True):
                dst[b, :, width - len(cols):] = src[b][:, cols]
            mask[b, width - len(cols):] = 1
        self.mask = mask
        self._set_cache(packed)

    # --- the step ----------------------------------------------------------------------------
    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row (B,) in row order; returns the next-token logits (B, V)."""
        B = self.batch_size
        mask = np.concatenate([self.mask, np.ones((B, 1), dtype=np.int64)], axis=1)  # (B, P+1)
        feeds = {"input_ids": tokens.reshape(B, 1).astype(np.int64, copy=False), "attention_mask": mask,
                 "position_ids": self.pos.reshape(B, 1)}
        logits, presents = self._run(feeds, self.cache)
        self.cache = presents  # each (B, nh, P+1, hs)
        self.mask = mask
        self.pos = self.pos + 1
        # pos counts each row's real tokens, so no per-step pass over the mask is needed here
        if self.slots > 2 * int(self.pos.max()) + 256:
            self._maybe_compact()
        return logits[:, -1, :]  # (B, V)
