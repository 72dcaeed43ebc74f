"""PNG figures a user would rather see than read: the loss curve and attention maps."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig: Any, path: Path) -> None:
    # Write beside the target and rename, so a viewer never opens a half-written PNG.
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def plot_loss(records: list[dict[str, Any]], path: Path, vocab_size: int, log_scale: bool = False) -> None:
    """Train loss (every logged step) and val loss (every evaluation) against step."""
    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "train"]
    evals = [(r["step"], r["val_loss"]) for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1, alpha=0.8)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="val loss", lw=1.5)
    # A fresh model predicts uniformly: cross-entropy = log(vocab_size).
    ax.axhline(math.log(vocab_size), color="grey", ls="--", lw=1, label=f"log(vocab) = {math.log(vocab_size):.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    if log_scale:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("next-token prediction loss")
    _save(fig, path)


def plot_attention(maps: list[Any], labels: list[str], path: Path, grid: bool = True,
                   layers: list[int] | None = None) -> None:
    """One row per layer: the head-averaged map, then (with ``grid``) every head.

    maps: per layer an array (n_head, T, T); rows are queries, columns keys.
    layers: the model's layer number of each map, for the titles (default 0, 1, ...).
    """
    n_layer = len(maps)
    n_head = maps[0].shape[0]
    cols = 1 + (n_head if grid else 0)
    T = len(labels)
    cell = max(2.2, 0.28 * T)
    fig, axes = plt.subplots(n_layer, cols, figsize=(cell * cols, cell * n_layer), squeeze=False)
    names = layers if layers is not None else list(range(n_layer))
    for row, (layer, m) in enumerate(zip(names, maps, strict=True)):
        panels = [(m.mean(0), f"layer {layer}: heads averaged")]
        if grid:
            panels += [(m[h], f"layer {layer} head {h}") for h in range(n_head)]
        for col, (mat, title) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(mat, cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(title, fontsize=8)
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.set_xticklabels(labels, rotation=90, fontsize=6)
            ax.set_yticklabels(labels, fontsize=6)
            ax.set_xlabel("key", fontsize=7)
            ax.set_ylabel("query", fontsize=7)
    fig.tight_layout()
    _save(fig, path)
