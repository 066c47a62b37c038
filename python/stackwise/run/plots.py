"""Plots of a run, drawn from its ``metrics.jsonl`` with matplotlib's Agg backend (no display).

- ``plots/loss.png``: training loss (logged steps) and validation loss (evaluations) over global
  steps; dotted vertical lines where a new stack starts; the unigram baseline as a horizontal line
  when known.
- ``plots/memory.png``: peak memory of each stage (process max RSS on CPU, peak allocated bytes
  on CUDA), one bar per stage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    import io

    from stackwise._io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_loss(
    records: list[dict[str, Any]],
    path: str | os.PathLike[str],
    baseline: float | None = None,
    title: str = "loss",
) -> Path:
    """Train and validation loss over global steps, stage boundaries marked."""
    plt = _pyplot()
    steps = [r for r in records if r.get("type") == "step"]
    evals = [r for r in records if r.get("type") == "eval" and r.get("eval_loss") is not None]
    starts = [r for r in records if r.get("type") == "stage_start"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot(
            [r["global_step"] for r in steps],
            [r["loss"] for r in steps],
            label="train",
            color="tab:blue",
            linewidth=1,
        )
    if evals:
        ax.plot(
            [r["global_step"] for r in evals],
            [r["eval_loss"] for r in evals],
            "o-",
            label="validation",
            color="tab:orange",
            markersize=4,
        )
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="unigram baseline")
    for r in starts:
        if r["stage"] > 0:
            ax.axvline(r["global_step"], color="black", linestyle=":", linewidth=1)
        ax.annotate(
            f"stack {r['stage'] + 1}",
            xy=(r["global_step"], 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=8,
        )
    ax.set_xlabel("global step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def plot_memory(records: list[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Peak memory per stage (MiB), one bar per ``stage_end`` record."""
    plt = _pyplot()
    ends = [r for r in records if r.get("type") == "stage_end"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = [f"stack {r['stage'] + 1}" for r in ends]
    values = [r["peak_memory_bytes"] / 2**20 for r in ends]
    bars = ax.bar(labels, values, color="tab:green")
    for bar, v in zip(bars, values, strict=True):
        ax.annotate(
            f"{v:.0f}",
            xy=(bar.get_x() + bar.get_width() / 2, v),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title("peak memory per stage")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
