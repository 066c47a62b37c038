"""``metrics.jsonl``: one JSON object per line, each with a ``type``; and the same scalars as
TensorBoard events (``torch.utils.tensorboard``; ``tensorboard`` is a requirement).

Record types and their keys (every record also has ``time``, seconds since the Unix epoch):

- ``stage_start``: stage, stack_index, n_stacks, target_stacks, steps, mask_ratio,
  global_step (steps taken before this stage), cache_fill_s
- ``step`` (every ``training.log_every`` steps and at the last step of a stage): stage,
  stack_index, step, steps, global_step, loss, lr, tokens, tokens_per_s, step_ms
- ``eval`` (every ``training.eval_every`` steps and at the end of each stage): stage, step,
  global_step, eval_loss
- ``stage_end``: stage, stack_index, n_stacks, steps, global_step, train_loss (mean of the
  stage's last 10% of steps), eval_loss (null without a validation split), tokens,
  tokens_per_s, wall_s, cache_fill_s, peak_memory_bytes, mask_ratio
- ``final``: val_loss, perplexity, bits_per_byte, bits_per_byte_quantity (what that figure
  measures, :mod:`stackwise.run.likelihood`; both null for mlm racks), unigram_loss,
  masked_accuracy (null for causal racks), wall_s

Losses are mean cross entropy in nats per predicted token. :data:`SCHEMA` lists the keys and
:func:`check_record` validates a record against it.

TensorBoard scalars (:data:`TENSORBOARD_TAGS`), each at its record's ``global_step``:
``train/loss``, ``train/lr``, ``train/tokens_per_s`` (``step``), ``val/loss`` (``eval``),
``stage/peak_memory_mb``, ``stage/tokens_per_s`` (``stage_end``) and ``final/val_loss``,
``final/perplexity``, ``final/bits_per_byte`` (``final``, at the last global step; a null figure
is not written).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from stackwise.exceptions import TrainingError

SCHEMA: dict[str, tuple[str, ...]] = {
    "stage_start": (
        "stage",
        "stack_index",
        "n_stacks",
        "target_stacks",
        "steps",
        "mask_ratio",
        "global_step",
        "cache_fill_s",
    ),
    "step": (
        "stage",
        "stack_index",
        "step",
        "steps",
        "global_step",
        "loss",
        "lr",
        "tokens",
        "tokens_per_s",
        "step_ms",
    ),
    "eval": ("stage", "step", "global_step", "eval_loss"),
    "stage_end": (
        "stage",
        "stack_index",
        "n_stacks",
        "steps",
        "global_step",
        "train_loss",
        "eval_loss",
        "tokens",
        "tokens_per_s",
        "wall_s",
        "cache_fill_s",
        "peak_memory_bytes",
        "mask_ratio",
    ),
    "final": (
        "val_loss",
        "perplexity",
        "bits_per_byte",
        "bits_per_byte_quantity",
        "unigram_loss",
        "masked_accuracy",
        "wall_s",
    ),
}


TENSORBOARD_TAGS: dict[str, tuple[tuple[str, str], ...]] = {
    "step": (("train/loss", "loss"), ("train/lr", "lr"), ("train/tokens_per_s", "tokens_per_s")),
    "eval": (("val/loss", "eval_loss"),),
    "stage_end": (
        ("stage/peak_memory_mb", "peak_memory_bytes"),
        ("stage/tokens_per_s", "tokens_per_s"),
    ),
    "final": (
        ("final/val_loss", "val_loss"),
        ("final/perplexity", "perplexity"),
        ("final/bits_per_byte", "bits_per_byte"),
    ),
}
"""TensorBoard tag and ``metrics.jsonl`` key of every scalar mirrored, by record type."""


def check_record(record: dict[str, Any]) -> None:
    """Raise ValueError when ``record`` lacks a key of its type (or has an unknown type)."""
    kind = record.get("type")
    if kind not in SCHEMA:
        raise ValueError(f"unknown record type {kind!r}; known: {sorted(SCHEMA)}")
    missing = [k for k in ("time", *SCHEMA[kind]) if k not in record]
    if missing:
        raise ValueError(f"{kind} record lacks {missing}")


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every record of a ``metrics.jsonl``.

    Only a torn last line (one without its newline: the record being written when a run
    crashed) is skipped. Any other line that is not a JSON object raises :class:`TrainingError`
    naming the file and the line, so a damaged file is never read as a shorter one.
    """
    p = Path(path)
    if not p.is_file():
        return []
    *complete, tail = p.read_bytes().split(b"\n")
    out = []
    for number, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        record = _record(raw)
        if record is None:
            raise TrainingError(
                f"{p}: line {number} is not a JSON record ({raw[:60]!r}); the file is damaged: "
                "repair or delete that line"
            )
        out.append(record)
    if tail.strip():
        record = _record(tail)  # a whole record whose newline is missing counts
        if record is not None:
            out.append(record)
    return out


def _record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def seal_tail(path: str | os.PathLike[str]) -> bool:
    """Make ``path`` end with a newline before records are appended to it: a torn last line is
    cut off, a whole last record missing its newline gets one. Returns True when it changed
    the file (appending to a torn line would fuse the next record with it)."""
    p = Path(path)
    if not p.is_file():
        return False
    data = p.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    cut = data.rfind(b"\n") + 1
    with open(p, "r+b") as f:
        if _record(data[cut:]) is not None:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    return True


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` (flushed per record, so a crash loses at most the
    line being written) and, with ``tensorboard_dir``, mirrors their scalars to TensorBoard
    events there (flushed per record)."""

    def __init__(self, path: str | os.PathLike[str], tensorboard_dir: str | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # a requirement: a broken environment, said plainly
                raise TrainingError(
                    "TensorBoard events need the tensorboard package, a requirement of "
                    "stackwise (pip install -r requirements.txt): " + str(exc)
                ) from exc
            self._tb = SummaryWriter(str(tensorboard_dir))
        seal_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._last_step = 0

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def write(self, kind: str, **fields: Any) -> dict[str, Any]:
        record = {"type": kind, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in fields.items()})
        check_record(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tensorboard(record)
        return record

    def _tensorboard(self, record: dict[str, Any]) -> None:
        kind = record["type"]
        step = record.get("global_step", self._last_step)
        self._last_step = step
        for tag, key in TENSORBOARD_TAGS.get(kind, ()):
            value = record[key]
            if value is None:
                continue
            if key == "peak_memory_bytes":
                value = value / 2**20
            self._tb.add_scalar(tag, value, step, walltime=record["time"])
        self._tb.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def truncate_after(path: str | os.PathLike[str], global_step: int, completed_stages: int) -> int:
    """Drop the records a resumed run will write again: steps and evaluations past
    ``global_step`` and stage records of stages not completed. Returns how many were dropped."""
    from stackwise._io import atomic_write_text

    records = read_metrics(path)
    keep = []
    for r in records:
        kind = r.get("type")
        if kind in ("step", "eval") and r.get("global_step", 0) > global_step:
            continue
        if kind in ("stage_start", "stage_end") and r.get("stage", 0) >= completed_stages:
            continue
        if kind == "final":
            continue
        keep.append(r)
    if len(keep) != len(records):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(records) - len(keep)
