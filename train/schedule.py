"""The learning-rate schedule: linear warmup, cosine decay to a floor, over steps or over the time budget.

Pure arithmetic on a ``TrainConfig`` and a step; the loop calls ``set_learning_rates`` once per step.
It ignores what the optimizer is, except which of its groups are Muon's (they scale from ``muon_lr``).
"""

from __future__ import annotations

import math

import torch

from nextoken.train.config import TrainConfig


def lr_at(it: int, cfg: TrainConfig, time_fraction: float | None = None) -> float:
    """Linear warmup to ``learning_rate``, cosine decay to ``min_lr`` at ``lr_decay_iters``, then flat.

    With ``lr_schedule="time"`` the decay follows whichever budget is further spent: the time
    (``time_fraction``: training seconds so far over ``max_time``) or the steps (over
    ``max_iters``). A run ends fully decayed whichever stops it, whatever the machine's speed
    (at the price of a resume that is exact only up to the clock: the rate then depends on timing).
    """
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "time":
        if time_fraction is None:
            raise ValueError("lr_schedule='time' needs the fraction of max_time used")
        steps = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
        ratio = min(1.0, max(0.0, time_fraction, steps))
    else:
        decay_iters = cfg.lr_decay_iters or cfg.max_iters
        if it >= decay_iters:
            return cfg.min_lr
        ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def set_learning_rates(optimizer: torch.optim.Optimizer, it: int, cfg: TrainConfig,
                       time_fraction: float | None = None) -> float:
    """Every group at step ``it`` of the schedule, scaled from its own peak; returns AdamW's lr.

    AdamW groups get ``lr_at`` itself; Muon groups the same curve from ``muon_lr`` (warmup,
    cosine decay, and a floor at the same fraction ``min_lr / learning_rate``).
    """
    lr = lr_at(it, cfg, time_fraction)
    for group in optimizer.param_groups:
        group["lr"] = lr * (cfg.muon_lr / cfg.learning_rate) if group.get("muon", False) else lr
    return lr
