"""Quantised graphs against the fp32 graphs they came from, with stated tolerances applied at export.

A quantised graph is never bit-equal to PyTorch, so ``verify.py``'s 1e-4 bound does not apply;
instead each quantised graph is run beside its own fp32 graph (same export, same ONNX Runtime)
on the same inputs, teacher-forced (both sides read the same tokens, so one early difference
does not make every later position incomparable), and the figures below are recorded in the
manifest under ``verification.quantization``:

* ``mean_kl``: mean over real positions of KL(p_fp32 || p_quantised), nats per token. It is what
  quantisation costs in loss, and it is insensitive to near-ties that flip an argmax without
  changing the distribution (on small or barely trained models many logits are tied).
* ``top1_agreement``: share of positions where both argmaxes agree (reported, not gated).
* ``max_abs_diff``: max |delta logit| (reported, not gated).
* ``perplexity`` / ``perplexity_fp32``: on the run's validation tokens (the first
  ``QUALITY_TOKENS``, non-overlapping windows), through ``model.onnx``; ``perplexity_increase``
  is their ratio minus one.

``TOLERANCES`` holds the bounds per scheme; the export fails (naming ``--quantize``) when a
graph exceeds them, and writes nothing. They were set from the trained presets' models
(benchmarks/RESULTS.md, issue 22) with room for smaller models, whose weights quantise worse.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nextoken.export.verify import OrtDecoder, left_pad, make_session

QUALITY_TOKENS = 4096  # validation tokens scored for the perplexity figures
QUALITY_WINDOW = 512  # tokens per window (the model's context if shorter)


@dataclass(frozen=True)
class Tolerance:
    mean_kl: float  # nats per token, on each graph's teacher-forced comparison
    perplexity_increase: float  # (quantised / fp32) - 1 on validation tokens


TOLERANCES = {
    "int8": Tolerance(mean_kl=0.02, perplexity_increase=0.03),
    "int8-block": Tolerance(mean_kl=0.01, perplexity_increase=0.02),
    "int4": Tolerance(mean_kl=0.10, perplexity_increase=0.15),
}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """ref, got (N, V): the fp32 graph's and the quantised graph's logits at the same N positions."""
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)  # (N,)
    return {"positions": int(ref.shape[0]), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "max_abs_diff": float(np.abs(ref - got).max()), "finite": bool(np.isfinite(got).all())}


def compare_merged(fp32_path: Path, quant_path: Path, prompts: list[list[int]], *, pad_id: int, n_layer: int,
                   n_kv_head: int, head_dim: int) -> dict[str, Any]:
    """model.onnx: one left-padded prefill of ``prompts``; every real position compared."""
    ids, mask = left_pad(prompts, pad_id)
    outs = []
    for path in (fp32_path, quant_path):
        dec = OrtDecoder(make_session(str(path)), n_layer, n_kv_head, head_dim)
        outs.append(dec.prefill(ids, mask))  # (B, T, V)
        del dec
    real = mask.astype(bool)
    return compare_logits(outs[0][real], outs[1][real])


def compare_serving(fp32_dir: Path, quant_dir: Path, config: dict[str, Any], prompts: list[list[int]], *,
                    chunk: int = 5, new_tokens: int = 8) -> dict[str, Any]:
    """serving.onnx through the engine's Runner: prompts prefilled in chunks into their own slots, then
    ``new_tokens`` batched decode steps feeding both sides the fp32 graph's greedy token."""
    from nextoken.export.artifact import Artifact
    from nextoken.export.runtime import Runner

    n = len(prompts)
    max_len = min(int(config["n_positions"]), max(map(len, prompts)) + new_tokens + 1)  # a small cache: big models
    runners = [Runner(Artifact(d, config, {}, {}), max_slots=n, max_len=max_len, threads=1)
               for d in (fp32_dir, quant_dir)]
    ref: list[np.ndarray] = []
    got: list[np.ndarray] = []
    last = np.zeros(n, dtype=np.int64)
    lengths = np.zeros(n, dtype=np.int64)
    for s, p in enumerate(prompts):
        for start in range(0, len(p), chunk):
            part = p[start:start + chunk]
            a, b = (r.prefill(s, part, start) for r in runners)  # (T, V) each
            ref.append(a)
            got.append(b)
        last[s] = int(ref[-1][-1].argmax())
        lengths[s] = len(p)
    slots = np.arange(n)
    for _ in range(new_tokens):
        if int(lengths.max()) >= max_len:
            break
        a, b = (r.decode(slots, last, lengths[slots], lengths.copy()) for r in runners)  # (n, V) each
        ref.append(a.copy())
        got.append(b.copy())
        last = a.argmax(-1).astype(np.int64)
        lengths += 1
    return compare_logits(np.concatenate(ref), np.concatenate(got))


def perplexity(onnx_path: Path, tokens: np.ndarray, *, n_layer: int, n_kv_head: int, head_dim: int, window: int,
               batch: int = 4) -> float:
    """exp(mean next-token loss) over non-overlapping windows of ``window`` + 1 tokens (model.onnx)."""
    n = (len(tokens) - 1) // window
    if n < 1:
        raise ValueError(f"need more than {window} tokens for one window, got {len(tokens)}")
    seqs = np.stack([np.asarray(tokens[i * window: i * window + window + 1], dtype=np.int64) for i in range(n)])
    dec = OrtDecoder(make_session(str(onnx_path)), n_layer, n_kv_head, head_dim)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x = seqs[i:i + batch]  # (B, window + 1)
        logits = dec.prefill(x[:, :-1], np.ones_like(x[:, :-1]))  # (B, window, V)
        lp = _log_softmax(logits)
        total -= float(np.take_along_axis(lp, x[:, 1:, None], -1).sum())
        count += x[:, 1:].size
    return float(np.exp(total / count))


def check(scheme: str, merged: dict[str, Any], serving: dict[str, Any], ppl_fp32: float | None,
          ppl_quant: float | None, tokens: int) -> dict[str, Any]:
    """The manifest's ``verification.quantization``: figures, the tolerance and whether they pass."""
    tol = TOLERANCES[scheme]
    increase = None if ppl_fp32 is None or ppl_quant is None else ppl_quant / ppl_fp32 - 1.0
    failures = [f"{name} graph: mean KL {fig['mean_kl']:.4f} > {tol.mean_kl}"
                for name, fig in (("model.onnx", merged), ("serving.onnx", serving)) if fig["mean_kl"] > tol.mean_kl]
    failures += [f"{name} graph: non-finite logits" for name, fig in (("model.onnx", merged),
                                                                       ("serving.onnx", serving)) if not fig["finite"]]
    if increase is not None and increase > tol.perplexity_increase:
        failures.append(f"validation perplexity {ppl_quant:.4f} vs fp32 {ppl_fp32:.4f} "
                        f"(+{increase:.1%} > +{tol.perplexity_increase:.0%})")
    return {"reference": "the fp32 graphs of the same export (ONNX Runtime), teacher-forced",
            "tolerance": asdict(tol), "merged": merged, "serving": serving,
            "perplexity_fp32": ppl_fp32, "perplexity": ppl_quant, "perplexity_increase": increase,
            "perplexity_tokens": tokens, "passed": not failures, "failures": failures}
