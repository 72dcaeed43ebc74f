"""Parity check: the exported graph in ONNX Runtime against the PyTorch model it came from.

Both sides run the same left-padded batch of prompts of different lengths: one prefill
(past length 0, through the same merged graph), then greedy decode steps, each side feeding
back its own argmax and its own cache. Reported: max |delta logit| over real (non-padding)
positions at prefill and over all decode steps, and how many greedy steps agree.

The PyTorch side is ``GPT.forward``'s own cached path, not the export wrapper, so a drift
between the wrapper's mask and the model's shows up here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from nextoken.export.artifact import cache_names
from nextoken.train.model import GPT

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-2  # half precision against the fp32 model: a sanity bound, not parity
GREEDY_STEPS = 64


def make_session(path: str, *, threads: int = 1, providers: list[str] | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=providers or ["CPUExecutionProvider"])


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-align prompts: ids (B, T) int64 and mask (B, T) int64 with 0 on the left padding."""
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), T), dtype=np.int64)
    for r, p in enumerate(prompts):
        ids[r, T - len(p):] = p
        mask[r, T - len(p):] = 1
    return ids, mask


def positions(mask: np.ndarray, q_len: int) -> np.ndarray:
    """position_ids (B, q_len) for the last q_len slots of a (B, S) mask: cumsum - 1, clamped at 0."""
    return np.maximum(mask.cumsum(-1) - 1, 0)[:, -q_len:].astype(np.int64)


def default_prompts(vocab_size: int, block_size: int, batch: int = 4, seed: int = 0) -> list[list[int]]:
    """A batch of different lengths (the longest first, one of length 1) with room left to decode."""
    rng = np.random.default_rng(seed)
    longest = max(2, min(12, block_size // 4))
    lengths = [longest, 1, max(1, longest // 2), max(1, longest - 3)][:batch]
    lengths += [1 + i % longest for i in range(batch - len(lengths))]
    return [rng.integers(0, vocab_size, n).tolist() for n in lengths]


class OrtDecoder:
    """Prefill then one-token steps over a merged-graph session, the cache grown by the graph."""

    def __init__(self, session: ort.InferenceSession, n_layer: int, n_kv_head: int, head_dim: int,
                 cache_dtype: np.dtype = np.float32) -> None:
        self.session = session
        self.n_layer, self.n_kv_head, self.head_dim = n_layer, n_kv_head, head_dim
        self.cache_dtype = cache_dtype
        self.past_names = cache_names("past_key_values", n_layer)
        self.mask: np.ndarray | None = None
        self.past: list[np.ndarray] = []

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """ids, mask (B, T) -> logits (B, T, vocab); the cache starts empty (past length 0)."""
        B = ids.shape[0]
        empty = np.zeros((B, self.n_kv_head, 0, self.head_dim), dtype=self.cache_dtype)  # (B, nkv, 0, hs)
        self.mask = mask
        self.past = [empty] * (2 * self.n_layer)
        return self._run(ids)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (B,) -> logits (B, vocab) for the next position."""
        assert self.mask is not None, "prefill first"
        self.mask = np.concatenate([self.mask, np.ones((self.mask.shape[0], 1), dtype=np.int64)], axis=1)
        return self._run(tokens.astype(np.int64)[:, None])[:, -1]

    def _run(self, ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": self.mask, "position_ids": positions(self.mask, ids.shape[1])}
        feeds.update(zip(self.past_names, self.past, strict=True))
        logits, *self.past = self.session.run(None, feeds)
        return logits


def _torch_greedy(model: GPT, ids: np.ndarray, mask: np.ndarray, steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """PyTorch cached decode: prefill logits (B, T, V) and per-step logits [(B, V)] * steps."""
    t_mask = torch.from_numpy(mask)
    pos = torch.from_numpy(positions(mask, ids.shape[1]))  # (B, T)
    out = model(torch.from_numpy(ids), attention_mask=t_mask, position_ids=pos, use_cache=True)
    prefill = out.logits.float().numpy()
    cache, last = out.present_key_values, out.logits[:, -1].float()
    steps_logits = []
    for _ in range(steps):
        nxt = last.argmax(-1)  # (B,)
        t_mask = torch.cat([t_mask, torch.ones(t_mask.shape[0], 1, dtype=torch.long)], dim=1)  # (B, S+1)
        pos = torch.from_numpy(positions(t_mask.numpy(), 1))
        out = model(nxt[:, None], attention_mask=t_mask, position_ids=pos, past_key_values=cache, use_cache=True)
        cache, last = out.present_key_values, out.logits[:, -1].float()
        steps_logits.append(last.numpy())
    return prefill, steps_logits


@torch.no_grad()
def verify_onnx(model: GPT, onnx_path: str, *, dtype: str = "fp32", quantized: bool = False,
                prompts: list[list[int]] | None = None, steps: int = GREEDY_STEPS, pad_id: int = 0,
                providers: list[str] | None = None) -> dict[str, Any]:
    """Compare ``onnx_path`` with ``model`` (fp32, CPU) and return the figures for manifest.json.

    ``passed`` means max |delta| <= the tolerance and identical greedy tokens for every step run.
    Decode steps are capped so the longest row stays inside the position table; the figure
    recorded is the number actually run. Quantised graphs have no tolerance: they are reported.
    """
    model = model.float().cpu().eval()
    c = model.config
    prompts = prompts or default_prompts(c.vocab_size, c.block_size)
    ids, mask = left_pad(prompts, pad_id)
    steps = max(0, min(steps, c.block_size - ids.shape[1]))
    if providers is None:  # fp16 targets CUDA; without onnxruntime-gpu, ORT's CPU kernels still run it
        cuda = dtype == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    session = make_session(onnx_path, providers=providers)
    cache_dtype = np.float16 if dtype == "fp16" else np.float32
    dec = OrtDecoder(session, c.n_layer, c.n_kv_head, c.head_dim, cache_dtype)

    t_prefill, t_steps = _torch_greedy(model, ids, mask, steps)
    o_prefill = dec.prefill(ids, mask)
    real = mask.astype(bool)  # padded query rows hold garbage on both sides; compare real tokens only
    prefill_diff = float(np.abs(o_prefill[real] - t_prefill[real]).max())

    decode_diff, agree = 0.0, 0
    o_last, t_last = o_prefill[:, -1], t_prefill[:, -1]
    for i in range(steps):
        o_tok, t_tok = o_last.argmax(-1), t_last.argmax(-1)
        if not np.array_equal(o_tok, t_tok):
            break  # the two sides now decode different texts; later logits are not comparable
        agree += 1
        o_last, t_last = dec.step(o_tok), t_steps[i]
        decode_diff = max(decode_diff, float(np.abs(o_last - t_last).max()))
    finite = bool(np.isfinite(o_prefill).all() and np.isfinite(o_last).all())
    tolerance = None if quantized else (FP16_TOLERANCE if dtype == "fp16" else FP32_TOLERANCE)
    greedy_identical = agree == steps
    passed = finite and greedy_identical and (tolerance is None or max(prefill_diff, decode_diff) <= tolerance)
    return {
        "runtime": f"onnxruntime {ort.__version__}",
        "provider": session.get_providers()[0],
        "batch": len(prompts),
        "prompt_lengths": [len(p) for p in prompts],
        "prefill_max_abs_diff": prefill_diff,
        "decode_max_abs_diff": decode_diff,
        "tolerance": tolerance,
        "greedy_steps": steps,
        "greedy_identical_steps": agree,
        "greedy_identical": greedy_identical,
        "finite": finite,
        "passed": passed,
    }
