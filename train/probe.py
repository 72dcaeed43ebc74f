"""What a trained model believes: next-token distributions, per-token loss, attention maps.

The engine of ``nextoken inspect`` and ``nextoken attention`` (and the run viewer's attention maps);
named ``probe`` so that it does not shadow the standard library's ``inspect``.

Everything here takes a loaded ``GPT`` and a tokenizer and returns plain dataclasses, so the
CLIs only parse flags and print. Every text is read the way training saw documents: after an
``<|endoftext|>`` token, so the first real token is predicted too and position 0 is the
separator. Nothing here touches the training or serving hot paths: attention weights come
from ``GPT.attention_weights``, a separate recomputation, never from a flag in ``forward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tokenizers import Tokenizer

from nextoken.errors import UserError
from nextoken.train.model import GPT
from nextoken.train.sampling import sample_next
from nextoken.train.tokenizer import EOT, UNK


@dataclass
class Candidate:
    """One row of a next-token table."""

    rank: int  # 1 = most likely
    token_id: int
    token: str  # the decoded text of this one token (special tokens kept)
    probability: float
    logit: float


@dataclass
class NextTokenStep:
    """The distribution after ``context`` and the token the continuation took."""

    step: int  # 0 = right after the prompt
    context: str  # the text the model conditioned on (the prompt plus what was chosen so far)
    candidates: list[Candidate]
    chosen_id: int
    chosen: str
    chosen_probability: float
    chosen_rank: int  # the chosen token's rank in the full distribution (1 = the argmax)
    entropy: float  # of the full distribution, nats


@dataclass
class TokenLoss:
    position: int  # index of the predicted token in the text's tokens (0 = first)
    token_id: int
    token: str
    loss: float  # -log p(token | everything before it), nats
    probability: float
    top_token: str  # what the model thought most likely instead


@dataclass
class TextLoss:
    tokens: list[TokenLoss]
    mean_loss: float
    perplexity: float
    most_surprising: int  # index into ``tokens`` of the largest loss
    unknown_tokens: int = 0  # pieces the tokenizer maps to <unk> (never seen in training)


@dataclass
class AttentionMaps:
    labels: list[str]  # one per position, the separator first
    layers: list[int]
    maps: list[np.ndarray] = field(repr=False)  # per chosen layer: (n_head, T, T), rows = queries


def token_text(tok: Tokenizer, token_id: int) -> str:
    """The text of one token; special tokens spelled out rather than dropped."""
    return tok.decode([token_id], skip_special_tokens=False)


def axis_label(text: str) -> str:
    """A short, visible label for a plot axis: spaces as a visible mark, control characters escaped."""
    if text == EOT:
        return "<eot>"
    return repr(text)[1:-1].replace(" ", "\u2423") or "''"


def encode_document(tok: Tokenizer, text: str, eot_id: int | None = None) -> tuple[list[int], int]:
    """``[<|endoftext|>] + ids(text)`` and how many ids are ``<unk>``.

    ``eot_id`` is the run's document separator when it is not ``<|endoftext|>`` (``LoadedRun.eot_id``).
    """
    ids = tok.encode(text, add_special_tokens=False).ids if text else []
    unk = tok.token_to_id(UNK)
    n_unknown = sum(1 for i in ids if unk is not None and i == unk)
    return [tok.token_to_id(EOT) if eot_id is None else eot_id] + ids, n_unknown


def _table(logits: torch.Tensor, tok: Tokenizer, top_k: int) -> tuple[list[Candidate], torch.Tensor]:
    """Top-k rows of one position's logits (V,) and the full probabilities (V,)."""
    logits = logits.float()
    probs = logits.softmax(-1)  # (V,)
    k = min(top_k, logits.numel())
    top = torch.topk(probs, k)
    rows = [Candidate(r + 1, int(i), token_text(tok, int(i)), float(p), float(logits[i]))
            for r, (p, i) in enumerate(zip(top.values, top.indices, strict=True))]
    return rows, probs


@torch.no_grad()
def next_token_steps(model: GPT, tok: Tokenizer, prompt: str, *, top_k: int = 10, steps: int = 1,
                     temperature: float = 0.0, seed: int | None = None, eot_id: int | None = None
                     ) -> list[NextTokenStep]:
    """The next-token table after ``prompt``, then after each token of a continuation.

    The tables show the model's own distribution (temperature 1, no filtering), whatever
    ``temperature`` is; ``temperature`` only picks the continuation: 0 takes the argmax
    (greedy), above 0 samples from the tempered distribution with a generator seeded by
    ``seed``. A context longer than ``block_size`` keeps its last ``block_size`` tokens, as
    generation does.
    """
    if top_k < 1:
        raise UserError(f"must be >= 1, got {top_k}", flag="--top-k")
    if steps < 1:
        raise UserError(f"must be >= 1, got {steps}", flag="--steps")
    if temperature < 0:
        raise UserError(f"must be >= 0, got {temperature}", flag="--temperature")
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    ids, _ = encode_document(tok, prompt, eot_id)
    out: list[NextTokenStep] = []
    window = model.config.block_size
    for step in range(steps):
        x = torch.tensor([ids[-window:]], dtype=torch.long, device=device)  # (1, T)
        logits = model(x).logits[0, -1]  # (V,)
        rows, probs = _table(logits, tok, top_k)
        chosen = int(sample_next(logits[None], temperature=temperature, generator=gen)[0])
        rank = int((probs > probs[chosen]).sum()) + 1
        entropy = float(-(probs * probs.clamp_min(1e-30).log()).sum())
        context = tok.decode(ids[1:], skip_special_tokens=False)
        out.append(NextTokenStep(step, context, rows, chosen, token_text(tok, chosen), float(probs[chosen]), rank,
                                 entropy))
        ids.append(chosen)
    return out


@torch.no_grad()
def text_loss(model: GPT, tok: Tokenizer, text: str, eot_id: int | None = None) -> TextLoss:
    """Per-token cross-entropy of ``text``: how surprised the model is by each token in turn."""
    if not text:
        raise UserError("is empty; give some text to score", flag="--text")
    ids, n_unknown = encode_document(tok, text, eot_id)
    if len(ids) - 1 > model.config.block_size:
        raise UserError(f"is {len(ids) - 1} tokens after the <|endoftext|> separator; the model's context is "
                        f"{model.config.block_size} tokens", flag="--text")
    model.eval()
    device = next(model.parameters()).device
    x = torch.tensor([ids[:-1]], dtype=torch.long, device=device)  # (1, T)
    y = torch.tensor(ids[1:], dtype=torch.long, device=device)  # (T,)
    logp = model(x).logits[0].float().log_softmax(-1)  # (T, V)
    nll = -logp.gather(-1, y[:, None])[:, 0]  # (T,)
    best = logp.argmax(-1)  # (T,)
    rows = [TokenLoss(i, int(t), token_text(tok, int(t)), float(nll[i]), math.exp(-float(nll[i])),
                      token_text(tok, int(best[i]))) for i, t in enumerate(y.tolist())]
    mean = float(nll.mean())
    return TextLoss(rows, mean, math.exp(mean), int(nll.argmax()), n_unknown)


@torch.no_grad()
def attention_maps(model: GPT, tok: Tokenizer, text: str, layers: list[int] | None = None,
                   eot_id: int | None = None) -> AttentionMaps:
    """Softmax attention weights of ``text`` (after the separator) for the chosen layers."""
    if not text:
        raise UserError("is empty; give the text whose attention to plot", flag="--text")
    ids, _ = encode_document(tok, text, eot_id)
    if len(ids) > model.config.block_size:
        raise UserError(f"is {len(ids)} tokens with the <|endoftext|> separator; the model's context is "
                        f"{model.config.block_size} tokens", flag="--text")
    n_layer = model.config.n_layer
    chosen = list(range(n_layer)) if not layers else list(layers)
    for layer in chosen:
        if not 0 <= layer < n_layer:
            raise UserError(f"layer {layer} does not exist; the model has layers 0..{n_layer - 1}", flag="--layers")
    model.eval()
    device = next(model.parameters()).device
    maps = model.attention_weights(torch.tensor([ids], dtype=torch.long, device=device))  # per layer (1, nh, T, T)
    labels = [axis_label(token_text(tok, i)) for i in ids]
    return AttentionMaps(labels, chosen, [maps[layer][0].float().cpu().numpy() for layer in chosen])


def format_steps(steps: list[NextTokenStep]) -> str:
    """Plain-text tables, one per step, tokens shown with ``repr`` so spaces and newlines are visible."""
    lines: list[str] = []
    for s in steps:
        if len(steps) > 1:
            lines.append(f"step {s.step}: after {s.context!r}")
        else:
            lines.append(f"next token after {s.context!r}")
        lines.append(f"  {'rank':>4}  {'token':<16} {'prob':>7}  {'logit':>8}")
        for c in s.candidates:
            mark = " <" if c.token_id == s.chosen_id and len(steps) > 1 else ""
            lines.append(f"  {c.rank:>4}  {repr(c.token):<16} {c.probability:>7.4f}  {c.logit:>8.3f}{mark}")
        if len(steps) > 1:
            lines.append(f"  chose {s.chosen!r} (rank {s.chosen_rank}, p={s.chosen_probability:.4f}); "
                         f"entropy {s.entropy:.3f} nats")
        lines.append("")
    if len(steps) > 1:
        lines.append(f"continuation: {steps[-1].context + steps[-1].chosen!r}")
    return "\n".join(lines).rstrip() + "\n"


def format_text_loss(result: TextLoss) -> str:
    lines = [f"  {'pos':>4}  {'token':<14} {'loss':>7}  {'p(token)':>9}  {'model expected':<14}"]
    for i, t in enumerate(result.tokens):
        mark = "  <- most surprising" if i == result.most_surprising else ""
        lines.append(f"  {t.position:>4}  {repr(t.token):<14} {t.loss:>7.3f}  {t.probability:>9.4f}  "
                     f"{repr(t.top_token):<14}{mark}")
    lines.append(f"mean loss {result.mean_loss:.4f} nats/token, perplexity {result.perplexity:.2f} "
                 f"over {len(result.tokens)} tokens")
    if result.unknown_tokens:
        lines.append(f"note: {result.unknown_tokens} piece(s) of the text were never seen in training (<unk>)")
    return "\n".join(lines) + "\n"
