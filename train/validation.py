"""What a run checks as it trains: losses on fixed windows of each split, sample texts, the overfitting test.

None of it consumes the training RNG (samples draw from a generator of their own) or changes the
weights, so an evaluation never alters the run it measures, and a resume stays exact. It writes
nothing: the loop logs, plots and checkpoints what it returns.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from nextoken.train import distributed as D
from nextoken.train.config import TrainConfig
from nextoken.train.data import TokenData, eval_starts, model_inputs, windows
from nextoken.train.model import GPT
from nextoken.train.tokenizer import EOT


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenData, cfg: TrainConfig, device: torch.device,
             autocast: Any, info: D.DistInfo, eot_id: int | None = None) -> dict[str, float]:
    """Mean loss over fixed windows of each split, shared out between ranks (masked as in training)."""
    model.eval()
    out = {}
    per_rank = math.ceil(cfg.eval_iters * cfg.batch_size / info.world_size)
    for name, tokens in (("train", data.train), ("val", data.val)):
        starts = eval_starts(len(tokens), cfg.block_size, per_rank * info.world_size)[info.rank::info.world_size]
        total = torch.zeros(2, device=device)  # (sum of losses, count)
        for i in range(0, len(starts), cfg.batch_size):
            x, y = windows(tokens, starts[i: i + cfg.batch_size], cfg.block_size)
            extra = {k: v.to(device) for k, v in model_inputs(x, cfg, eot_id).items()}
            with autocast:
                loss = model(x.to(device), y.to(device), **extra).loss
            total += torch.stack([loss.float() * len(x), torch.tensor(float(len(x)), device=device)])
        D.all_reduce_mean(total, info)
        out[name] = (total[0] / total[1]).item()
    model.train()
    return out


def sample_texts(model: GPT, tok: Any, cfg: TrainConfig, device: torch.device, step: int, n: int = 2,
                 eot_id: int | None = None) -> list[str]:
    """``n`` samples from the start of a document, seeded by the step: the same texts on a resume."""
    eot = tok.token_to_id(EOT) if eot_id is None else eot_id
    gen = torch.Generator(device=device).manual_seed(cfg.seed + step)  # never touches the training RNG
    start = torch.full((n, 1), eot, dtype=torch.long, device=device)
    out = model.generate(start, cfg.sample_tokens, temperature=0.8, top_k=50, generator=gen)
    model.train()
    return [tok.decode(row[1:].tolist()) for row in out]


def overfit_start(history: list[tuple[int, float, float]], patience: int) -> int | None:
    """The step where val loss started rising for ``patience`` evaluations in a row while train loss fell."""
    if len(history) <= patience:
        return None
    recent = history[-(patience + 1):]
    val_up = all(b[2] > a[2] for a, b in zip(recent, recent[1:], strict=False))
    train_down = all(b[1] < a[1] for a, b in zip(recent, recent[1:], strict=False))
    return recent[0][0] if val_up and train_down else None
