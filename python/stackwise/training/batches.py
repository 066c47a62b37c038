"""Batches for the progressive trainer: checking what a data loader yields, and replaying its
order exactly, so a run resumed from a mid-stage checkpoint reads the same batches.

A batch is a LongTensor [B, S] of token ids or a dict with ``input_ids`` [B, S] and optionally
``attention_mask`` [B, S] (True = real token), ``labels`` [B, S] (-100 = no loss) and
``sample_id`` [B] (the masks' seed; default ``batch_idx * B + arange(B)``). Anything else raises
:class:`TrainingError` naming the batch and what was expected.

Order: a stage reads micro-batches in loader order, starting a new pass over the loader when one
ends. :class:`LoaderSource` records where it is (how many batches of the current pass it has
read, and the loader's sampler generator state before the pass began), so a resumed run sets the
generator back, starts the pass again and skips what was read: a ``DataLoader`` that shuffles
with a ``generator`` replays the same order. A loader that shuffles from the global RNG (no
``generator``) replays it only when the pass began after the checkpoint's RNG state was taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from stackwise.data.sharding import loader_generator  # re-exported: the trainers import it here
from stackwise.exceptions import TrainingError


def _is_int_tensor(t: Any) -> bool:
    return (
        isinstance(t, Tensor)
        and not t.dtype.is_floating_point
        and not t.dtype.is_complex
        and t.dtype != torch.bool
    )


def parse_batch(batch: Any, batch_idx: int, vocab_size: int, max_seq_len: int) -> dict:
    """The checked parts of one batch: ``input_ids`` (int64 [B, S]), ``attention_mask`` (bool
    [B, S] or None), ``labels`` (int64 [B, S] or None), ``sample_id`` (int64 [B])."""
    where = f"batch {batch_idx}"
    if isinstance(batch, Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise TrainingError(
            f"{where}: a batch must be a LongTensor [B, S] or a dict with 'input_ids', got "
            f"{type(batch).__name__}"
        )
    ids = batch["input_ids"]
    if not _is_int_tensor(ids) or ids.dim() != 2:
        kind = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise TrainingError(f"{where}: input_ids must be an integer tensor [B, S], got {kind}")
    b, s = ids.shape
    if b == 0 or s == 0:
        raise TrainingError(f"{where}: input_ids is empty, shape {tuple(ids.shape)}")
    if s > max_seq_len:
        raise TrainingError(
            f"{where}: sequences of {s} tokens exceed model.max_seq_len={max_seq_len}"
        )
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise TrainingError(
            f"{where}: input_ids must be in [0, {vocab_size}) (model.vocab_size), got [{lo}, {hi}]"
        )
    mask = batch.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, Tensor) or tuple(mask.shape) != (b, s):
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise TrainingError(f"{where}: attention_mask must be a tensor [{b}, {s}], got {got}")
        mask = mask.bool()
    labels = batch.get("labels")
    if labels is not None:
        if not _is_int_tensor(labels) or tuple(labels.shape) != (b, s):
            got = (
                f"{labels.dtype} {tuple(labels.shape)}"
                if isinstance(labels, Tensor)
                else type(labels).__name__
            )
            raise TrainingError(f"{where}: labels must be an integer tensor [{b}, {s}], got {got}")
        labels = labels.long()
        bad = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            raise TrainingError(f"{where}: labels must be -100 or in [0, {vocab_size})")
    sid = batch.get("sample_id")
    if sid is None:
        sid = torch.arange(b) + batch_idx * b
    else:
        try:
            sid = torch.as_tensor(sid).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TrainingError(f"{where}: sample_id must be integers [{b}]: {exc}") from exc
        if not _is_int_tensor(sid) or sid.numel() != b:
            raise TrainingError(
                f"{where}: sample_id must be {b} integers, got {sid.dtype} {tuple(sid.shape)}"
            )
    return {
        "input_ids": ids.long(),
        "attention_mask": mask,
        "labels": labels,
        "sample_id": sid.long(),
    }


def check_loader(dataloader: Any) -> None:
    """A stage reads the loader more than once (to count, to fill the cache, once per pass)."""
    if isinstance(dataloader, Iterator):
        raise TrainingError(
            "the dataloader must be re-iterable (a list, a DataLoader), not a one-shot "
            f"iterator ({type(dataloader).__name__}): each stage reads it from the start"
        )


class LoaderSource:
    """Micro-batches ``(batch_idx, batch)`` from a loader, pass after pass.

    ``position()`` is what a checkpoint keeps: ``{"opened": bool, "read": batches read from the
    current pass}`` plus, in ``generator_states()``, the generator before the pass began and
    now. ``LoaderSource(loader, n, resume=(position, states))`` continues from there.
    """

    def __init__(self, dataloader, n_batches: int, resume: tuple[dict, dict] | None = None):
        self.loader = dataloader
        self.n_batches = n_batches
        self.gen = loader_generator(dataloader)
        self.it: Iterator | None = None
        self.read = 0
        self.epoch_state: Tensor | None = None
        if resume is not None:
            position, states = resume
            if position["opened"] and position["read"] < n_batches:
                if self.gen is not None and "epoch_start" in states:
                    self.gen.set_state(states["epoch_start"])
                self._open()
                for _ in range(position["read"]):
                    self._next_raw()
            elif self.gen is not None and "now" in states:
                self.gen.set_state(states["now"])

    def _open(self) -> None:
        self.epoch_state = self.gen.get_state() if self.gen is not None else None
        self.it = iter(self.loader)
        self.read = 0

    def _next_raw(self):
        if self.it is None:
            self._open()
        try:
            batch = next(self.it)
        except StopIteration:
            self._open()
            try:
                batch = next(self.it)
            except StopIteration:
                raise TrainingError("the dataloader yielded no batches") from None
        idx = self.read
        self.read += 1
        return idx, batch

    def next(self) -> tuple[int, Any]:
        return self._next_raw()

    def position(self) -> dict:
        return {"opened": self.it is not None, "read": self.read}

    def generator_states(self) -> dict[str, Tensor]:
        if self.gen is None:
            return {}
        out = {"now": self.gen.get_state()}
        if self.epoch_state is not None:
            out["epoch_start"] = self.epoch_state
        return out


class CachedSource:
    """Cached batch ids, cycled; micro-batch m of the stage is ``ids[m % len(ids)]``.

    With ``prefetch`` (a callable taking a list of batch ids, e.g. a bound
    :meth:`CacheManager.prefetch`) and ``depth`` > 0, the ids of the next ``depth`` micro-batches
    are handed to it before each one is returned, so spilled batches are read from disk while the
    current one trains; the first ones are requested at construction, before the optimizer and
    the rest of the stage's setup run.
    """

    def __init__(
        self,
        ids: list[int],
        start: int = 0,
        prefetch: Callable[[list[int]], None] | None = None,
        depth: int = 0,
    ) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.ids = ids
        self.m = start
        self._prefetch = prefetch if depth else None
        self.depth = depth
        if self._prefetch is not None:
            self._prefetch(self.upcoming(start, depth))

    def upcoming(self, first: int, n: int) -> list[int]:
        """The batch ids of micro-batches ``first .. first + n - 1`` (distinct, in order)."""
        out: list[int] = []
        for m in range(first, first + min(n, len(self.ids))):
            bid = self.ids[m % len(self.ids)]
            if bid not in out:
                out.append(bid)
        return out

    def next(self) -> int:
        bid = self.ids[self.m % len(self.ids)]
        self.m += 1
        if self._prefetch is not None:
            self._prefetch(self.upcoming(self.m, self.depth))
        return bid


__all__ = ["CachedSource", "LoaderSource", "check_loader", "loader_generator", "parse_batch"]
