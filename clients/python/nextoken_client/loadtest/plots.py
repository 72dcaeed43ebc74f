"""PNG figures of a load test. Needs matplotlib: ``pip install 'nextoken-client[plots]'``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .stats import LevelSummary, RequestRecord

__all__ = ["plot_all"]


def plot_all(plot_dir: Path, summaries: Sequence[LevelSummary],
             records: Sequence[Sequence[RequestRecord]]) -> list[Path]:
    """Throughput and TTFT against load, and the E2E latency / TTFT distributions per level."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot-dir needs matplotlib: pip install 'nextoken-client[plots]'") from None

    plot_dir.mkdir(parents=True, exist_ok=True)
    open_loop = bool(summaries) and summaries[0].request_rate is not None
    xs = [s.request_rate if open_loop else s.concurrency for s in summaries]
    xlabel = "request rate (req/s)" if open_loop else "concurrency (requests in flight)"
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [s.output_throughput for s in summaries], "o-", label="output tok/s")
    ax.plot(xs, [s.total_token_throughput for s in summaries], "s--", label="total tok/s")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens / s")
    ax2 = ax.twinx()
    ax2.plot(xs, [s.request_throughput for s in summaries], "^:", color="gray", label="req/s")
    ax2.set_ylabel("requests / s")
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")
    ax.set_title("Throughput against load")
    paths.append(_save(fig, plot_dir / "throughput.png", plt))

    fig, ax = plt.subplots(figsize=(6, 4))
    for stat, style in (("p99", "o-"), ("p50", "s--")):
        ax.plot(xs, [s.ttft_ms[stat] if s.ttft_ms else float("nan") for s in summaries], style, label=f"{stat} TTFT")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("TTFT against load")
    ax.legend()
    paths.append(_save(fig, plot_dir / "ttft_p99.png", plt))

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for s, recs in zip(summaries, records, strict=True):
        e2e = sorted(r.latency * 1000 for r in recs if r.ok)
        ttft = sorted(r.ttft * 1000 for r in recs if r.ok and r.ttft is not None)
        for axis, values in ((left, e2e), (right, ttft)):
            if values:  # an empirical CDF: every request visible, no bin-width choice to argue over
                axis.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=s.level)
    left.set_xlabel("end-to-end latency (ms)")
    right.set_xlabel("time to first token (ms)")
    for axis in (left, right):
        axis.set_ylabel("fraction of requests")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("Latency distribution (CDF) per level")
    paths.append(_save(fig, plot_dir / "latency_distribution.png", plt))
    return paths


def _save(fig: object, path: Path, plt: object) -> Path:
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(path, dpi=110)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[attr-defined]
    return path
