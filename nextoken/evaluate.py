"""Held-out perplexity with lm-evaluation-harness's rolling windows, on an artifact or a run folder.

Each document (a text file, or one line of a ``.jsonl`` file) is scored on its own, exactly as
lm-eval's ``loglikelihood_rolling`` scores it (``get_rolling_token_windows`` with
``context_len=1``, then ``make_disjoint_window``), for a window of ``W`` input tokens:

* the first window predicts the document's first ``min(W, n)`` tokens from ``<|endoftext|>``
  followed by those tokens (the prefix token stands in for "start of document");
* every later window predicts the next ``W`` tokens (fewer at the end) and takes as context as
  much of the preceding text as fits, so each window is one forward pass of at most ``W``
  tokens: ``tokens[end - W - 1 : end - 1]`` in, ``tokens[end - k : end]`` scored.

Every token is predicted exactly once. ``W`` is lm-eval's ``max_length`` for its ``hf`` backend
and ``max_length - 2`` for its API backends (lm-eval 0.4.13: ``local-completions`` keeps one
position for the token it asks to generate and sends the ``W + 1`` tokens of a window as one
echoed prompt; so through our server ``W`` is at most the context - 2). The default is the
model's context, ``n_positions``.

Reported, over all documents: ``loss`` = -sum(log p) / tokens (nats per token, the training
loss), ``perplexity`` = exp(loss), ``bits_per_byte`` = -sum(log p) / (UTF-8 bytes * ln 2), and
lm-eval's ``byte_perplexity`` and ``word_perplexity`` (words counted as ``re.split(r"\\s+")``).

The artifact path needs only ONNX Runtime and ``tokenizers`` (no PyTorch): it runs
``model.onnx`` with an empty cache, one prefill per window. A run folder runs the PyTorch
checkpoint. Both return float32 logits; log-softmax and sums are float64.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nextoken.errors import UserError

EOT = "<|endoftext|>"
# logits (B, T, V) float32 for input ids (B, T) int64, no padding
Forward = Callable[[np.ndarray], np.ndarray]


def rolling_windows(tokens: list[int], prefix_token: int, window: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows: (context, continuation) pairs; every token is predicted once.

    ``context + continuation`` is at most ``window + 1`` tokens; the model reads all but the
    last and scores the continuation's tokens.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out: list[tuple[list[int], list[int]]] = []
    if not tokens:
        return out
    first = min(window, len(tokens))
    out.append(([prefix_token], tokens[:first]))  # [prefix] + tokens[:first-1] made disjoint
    predicted = first
    while predicted < len(tokens):
        k = min(len(tokens) - predicted, window)
        end = predicted + k
        ctx = tokens[max(0, end - window - 1): end - 1]
        out.append((ctx[: len(ctx) - (k - 1)], tokens[end - k: end]))
        predicted = end
    return out


@dataclass
class EvalResult:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    words: int = 0
    windows: int = 0
    window: int = 0
    sum_logprob: float = 0.0  # natural log, over every token of every document
    doc_logprobs: list[float] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return -self.sum_logprob / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return -self.sum_logprob / (self.bytes * math.log(2))

    @property
    def byte_perplexity(self) -> float:
        return math.exp(-self.sum_logprob / self.bytes)

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.sum_logprob / self.words)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(loss=self.loss, perplexity=self.perplexity, bits_per_byte=self.bits_per_byte,
                 byte_perplexity=self.byte_perplexity, word_perplexity=self.word_perplexity)
        return d


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def score_windows(forward: Forward, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8) -> float:
    """Sum of log p(continuation | context) over all pairs; pairs of equal length share a forward pass."""
    by_len: dict[int, list[tuple[list[int], list[int]]]] = {}
    for ctx, cont in pairs:
        by_len.setdefault(len(ctx) + len(cont) - 1, []).append((ctx, cont))
    total = 0.0
    for length, group in by_len.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i: i + batch_size]
            full = np.array([ctx + cont for ctx, cont in chunk], dtype=np.int64)  # (B, length + 1)
            logp = _log_softmax(forward(full[:, :-1]))  # (B, length, V)
            for r, (_ctx, cont) in enumerate(chunk):
                k = len(cont)
                targets = full[r, -k:]  # the continuation
                total += float(logp[r, length - k: length][np.arange(k), targets].sum())
    return total


def iter_documents(paths: list[Path], text_field: str = "text") -> Iterator[str]:
    """Each text file is one document; each non-empty line of a ``.jsonl`` file is one (``text_field``)."""
    for path in paths:
        try:
            if path.suffix.lower() == ".jsonl":
                for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except ValueError as e:
                        raise UserError(f"{path}:{lineno} is not valid JSON ({e})", flag="--data") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                        raise UserError(f"{path}:{lineno} has no string field {text_field!r}", flag="--text-field")
                    yield obj[text_field]
            else:
                with open(path, encoding="utf-8", newline="") as f:  # keep \r\n: bytes are counted as stored
                    yield f.read()
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})", flag="--data") from None
        except OSError as e:
            raise UserError(f"{path} cannot be read: {e}", flag="--data") from None


def evaluate_texts(forward: Forward, encode: Callable[[str], list[int]], texts: list[str] | Iterator[str], *,
                   prefix_token: int, window: int, batch_size: int = 8,
                   progress: Callable[[int], None] | None = None) -> EvalResult:
    """Score every document with rolling windows of ``window`` input tokens."""
    res = EvalResult(window=window)
    for text in texts:
        ids = encode(text)
        pairs = rolling_windows(ids, prefix_token, window)
        lp = score_windows(forward, pairs, batch_size) if pairs else 0.0
        res.documents += 1
        res.tokens += len(ids)
        res.bytes += len(text.encode("utf-8"))
        res.words += len(re.split(r"\s+", text))
        res.windows += len(pairs)
        res.sum_logprob += lp
        res.doc_logprobs.append(lp)
        if progress is not None:
            progress(res.documents)
    if res.tokens == 0:
        raise UserError("the documents hold no tokens to score", flag="--data")
    return res


# --- the two backends -----------------------------------------------------------------------------

@dataclass
class Scorer:
    forward: Forward
    encode: Callable[[str], list[int]]
    eos_token_id: int
    context: int  # n_positions: the longest window the model takes
    source: str  # "artifact" | "run"
    description: str
    quantization: dict[str, Any] | None = None  # an artifact's quantisation figures from its export, if any


def onnx_forward(onnx_path: Path, n_layer: int, n_kv_head: int, head_dim: int, threads: int = 1) -> Forward:
    """model.onnx as a plain forward pass: empty past, all-ones mask, positions 0..T-1."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    past_type = next(i.type for i in session.get_inputs() if i.name == "past_key_values.0.key")
    cache_dtype = np.float16 if "float16" in past_type else np.float32
    names = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    wanted = ["logits"]

    def forward(ids: np.ndarray) -> np.ndarray:
        B, T = ids.shape
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": np.ones((B, T), dtype=np.int64),
                                        "position_ids": np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()}
        empty = np.zeros((B, n_kv_head, 0, head_dim), dtype=cache_dtype)  # (B, n_kv_head, 0, hs)
        feeds.update({n: empty for n in names})
        return session.run(wanted, feeds)[0]  # (B, T, vocab)

    return forward


def artifact_scorer(path: Path, threads: int = 1) -> Scorer:
    from tokenizers import Tokenizer

    from nextoken.export.artifact import ArtifactError, eos_ids, load_artifact

    try:
        art = load_artifact(path)
    except ArtifactError as e:
        raise UserError(str(e), flag="RUN_OR_ARTIFACT") from None
    c = art.config
    tok = Tokenizer.from_file(str(art.tokenizer_path))
    forward = onnx_forward(art.onnx_path, c["n_layer"], c.get("n_kv_head") or c["n_head"], c["head_dim"], threads)
    quant = art.manifest.get("export", {}).get("quantize", "none")
    recorded = art.manifest.get("verification", {}).get("quantization")
    if recorded is not None:
        recorded = {"scheme": quant, **recorded}
    return Scorer(forward, lambda s: tok.encode(s, add_special_tokens=False).ids, eos_ids(c)[0],
                  int(c["n_positions"]), "artifact",
                  f"artifact {art.model_id} (ONNX Runtime, model.onnx{'' if quant == 'none' else ', ' + quant})",
                  recorded)


def run_scorer(path: Path, checkpoint: str = "best", threads: int = 1) -> Scorer:
    import torch

    from nextoken.export.source import load_source

    if threads:
        torch.set_num_threads(threads)
    src = load_source(path, checkpoint)
    model = src.model

    @torch.no_grad()
    def forward(ids: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(ids)).logits.float().numpy()  # (B, T, vocab)

    return Scorer(forward, lambda s: src.tokenizer.encode(s, add_special_tokens=False).ids, src.eos_token_id,
                  src.config.block_size, "run",
                  f"{src.describe()} (PyTorch)")


def make_scorer(path: str | Path, checkpoint: str | None = None, threads: int = 1) -> Scorer:
    """An artifact folder (manifest.json) runs in ONNX Runtime; a run folder (config.json) in PyTorch.

    ``checkpoint`` (default ``best``) picks a run's checkpoint; an artifact holds one model.
    """
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p} does not exist", flag="RUN_OR_ARTIFACT")
    if (p / "manifest.json").is_file():
        if checkpoint is not None:
            raise UserError("an artifact holds one model; --checkpoint applies to run folders",
                            flag="--checkpoint")
        return artifact_scorer(p, threads)
    if (p / "config.json").is_file():
        return run_scorer(p, checkpoint or "best", threads)
    raise UserError(f"{p} is neither an artifact (manifest.json) nor a run folder (config.json)",
                    flag="RUN_OR_ARTIFACT")
