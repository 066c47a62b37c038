"""Draws docs/progressive-stages.png: append and prepend training, stage by stage.

Each row is one building mode, each column one stage of a three-stack rack. A box is a part of
the rack (embeddings, stacks, head) coloured by what the stage does with it: trained, frozen, or
cached (its output was computed once and is read back at every step). The figure follows what
``stackwise.training.progressive`` does; the README's "How progressive training works" explains
it. Run from the repository root (needs matplotlib, a pinned requirement):

    python docs/draw_stages.py [--out docs/progressive-stages.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

COLOURS = {"train": "#f28e2b", "frozen": "#9fb4cc", "cached": "#cfd8e3", "absent": "#ffffff"}
STAGES = 3
BOX_W, BOX_H, GAP = 0.9, 0.55, 0.18


def stage_parts(mode: str, stage: int) -> list[tuple[str, str]]:
    """(label, state) of each part from input to output at ``stage`` (0-based) of ``mode``."""
    parts: list[tuple[str, str]] = []
    if mode == "append":
        # Stacks 0..stage-1 are the frozen trunk whose output is cached; the embeddings train
        # with stack 0 only; the head trains at every stage.
        parts.append(("embed", "train" if stage == 0 else "cached"))
        for s in range(stage):
            parts.append((f"stack {s + 1}", "cached"))
        parts.append((f"stack {stage + 1}", "train"))
        parts.append(("head", "train"))
    else:
        # Prepend: the new stack goes on the left (input side), the stacks trained before sit
        # between it and the head and stay frozen; the embeddings of the corrupted input are
        # what is cached. The last stack trained is the first the input meets.
        parts.append(("embed", "train" if stage == 0 else "cached"))
        parts.append((f"stack {STAGES - stage}", "train"))
        for s in range(STAGES - stage + 1, STAGES + 1):
            parts.append((f"stack {s}", "frozen"))
        parts.append(("head", "train" if stage == 0 else "frozen"))
    return parts


def draw_column(ax, parts: list[tuple[str, str]], x: float, caption: str) -> None:
    """One stage: boxes stacked bottom (input) to top (output)."""
    for i, (label, state) in enumerate(parts):
        y = i * (BOX_H + GAP)
        box = FancyBboxPatch(
            (x, y),
            BOX_W,
            BOX_H,
            boxstyle="round,pad=0.02",
            facecolor=COLOURS[state],
            edgecolor="#333333",
            linewidth=1.0,
            hatch="//" if state == "cached" else None,
        )
        ax.add_patch(box)
        ax.text(
            x + BOX_W / 2,
            y + BOX_H / 2,
            label,
            ha="center",
            va="center",
            fontsize=8,
            bbox={"facecolor": COLOURS[state], "edgecolor": "none", "pad": 1.5},
        )
        if i:
            ax.annotate(
                "",
                xy=(x + BOX_W / 2, y),
                xytext=(x + BOX_W / 2, y - GAP),
                arrowprops={"arrowstyle": "->", "lw": 0.8},
            )
    ax.text(x + BOX_W / 2, -0.35, caption, ha="center", va="top", fontsize=8)


def draw(out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.2))
    captions = {
        "append": ["stage 1", "stage 2", "stage 3"],
        "prepend": ["stage 1 (mask low)", "stage 2", "stage 3 (mask high)"],
    }
    titles = {
        "append": "append: grows left to right (input to output)",
        "prepend": "prepend: grows right to left (depth as time)",
    }
    for ax, mode in zip(axes, ("append", "prepend"), strict=True):
        for stage in range(STAGES):
            draw_column(ax, stage_parts(mode, stage), stage * 1.4, captions[mode][stage])
        ax.set_xlim(-0.2, STAGES * 1.4 - 0.3)
        ax.set_ylim(-0.8, (STAGES + 2) * (BOX_H + GAP))
        ax.set_title(titles[mode], fontsize=10)
        ax.axis("off")
    handles = [
        FancyBboxPatch((0, 0), 1, 1, facecolor=COLOURS["train"], edgecolor="#333333"),
        FancyBboxPatch((0, 0), 1, 1, facecolor=COLOURS["frozen"], edgecolor="#333333"),
        FancyBboxPatch((0, 0), 1, 1, facecolor=COLOURS["cached"], edgecolor="#333333", hatch="//"),
    ]
    labels = [
        "trained in this stage",
        "frozen (run forward, gradients pass through)",
        "frozen and cached (output computed once per batch)",
    ]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.text(0.5, 0.93, "input at the bottom, output at the top", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "progressive-stages.png"
    )
    args = parser.parse_args()
    draw(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
