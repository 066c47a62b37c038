"""Data for data-parallel training: each of W ranks reads its share of every *global* batch.

Rank r's batch i is the strided slice ``[r::W]`` of global batch i of a one-process run with the
global batch size B (each rank gets B / W rows), so a W-process run computes the same gradient
as the one-process run: masks are keyed by sample id, and every row keeps its *global* sample id.

- :class:`ShardedBatches`: wraps a re-iterable of global batches (a list, a ``DataLoader`` of
  batch B) and yields the rank's slice of each. A batch is a LongTensor [B, S] or a dict with
  ``input_ids`` [B, S] and optionally ``attention_mask``, ``labels`` [B, S] and ``sample_id`` [B]
  (default ``i * B + arange(B)``, the one-process default).
- :class:`RankShardSampler`: ``DistributedSampler`` semantics for a map-style dataset, drawn so
  that the rank's ``DataLoader`` of batch B / W yields exactly those slices: one permutation of
  the dataset per pass (deterministic by seed and pass), cut to whole global batches (or padded
  by repeating its start when the dataset is smaller than one global batch), and rank r takes
  positions ``r, r + W, ...``. Its ``generator`` advances once per pass, so the trainer's
  checkpoints record and replay the order like a shuffling ``DataLoader``'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from stackwise.exceptions import ConfigurationError, TrainingError


def loader_generator(dataloader: Any) -> torch.Generator | None:
    """The generator a ``DataLoader`` (or its sampler) shuffles with, if any."""
    for owner in (dataloader, getattr(dataloader, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator):
            return g
    return None


def _check_rank(rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1):
        raise ConfigurationError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise ConfigurationError(f"rank must be in [0, {world_size}), got {rank!r}")


def shard_batch(batch: Any, batch_idx: int, rank: int, world_size: int) -> dict[str, Tensor]:
    """Rank ``rank``'s rows ``[rank::world_size]`` of global batch ``batch_idx``, with global
    sample ids."""
    if isinstance(batch, Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), Tensor):
        raise TrainingError(
            f"batch {batch_idx}: a batch must be a LongTensor [B, S] or a dict with 'input_ids', "
            f"got {type(batch).__name__}"
        )
    b = batch["input_ids"].shape[0]
    if b % world_size:
        raise TrainingError(
            f"batch {batch_idx}: the global batch of {b} rows does not split over {world_size} "
            "ranks; use a batch size divisible by the world size"
        )
    out = dict(batch)
    if out.get("sample_id") is None:
        out["sample_id"] = torch.arange(b) + batch_idx * b
    for key, value in list(out.items()):
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == b:
            out[key] = value[rank::world_size]
    return out


class ShardedBatches:
    """Rank ``rank``'s slice of each global batch of ``batches`` (re-iterable, like its
    source). ``generator`` is the source's shuffling generator, so resuming replays it."""

    rank_sharded = True

    def __init__(self, batches, rank: int, world_size: int) -> None:
        if isinstance(batches, Iterator):
            raise TrainingError(
                "the dataloader must be re-iterable (a list, a DataLoader), not a one-shot "
                f"iterator ({type(batches).__name__}): each stage reads it from the start"
            )
        _check_rank(rank, world_size)
        self.batches = batches
        self.rank = rank
        self.world_size = world_size

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            yield shard_batch(batch, i, self.rank, self.world_size)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def generator(self) -> torch.Generator | None:
        return loader_generator(self.batches)


class RankShardSampler(Sampler[int]):
    """Indices of rank ``rank`` (see the module docstring); use with a ``DataLoader`` of
    ``batch_size = global_batch // world_size`` and no shuffling of its own.

    Args:
        n: dataset length. global_batch: B, divisible by ``world_size``.
        seed: the permutation of pass k is the k-th draw of a generator seeded with ``seed``;
            :meth:`set_epoch` reseeds it with ``seed + epoch`` (``DistributedSampler``'s call).
        shuffle: False keeps dataset order.
    """

    rank_sharded = True

    def __init__(
        self,
        n: int,
        rank: int,
        world_size: int,
        global_batch: int,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        _check_rank(rank, world_size)
        if global_batch < 1 or global_batch % world_size:
            raise ConfigurationError(
                f"{global_batch} is not a positive multiple of the world size {world_size}",
                "training.batch_size",
            )
        if n < 1:
            raise ConfigurationError(f"the dataset is empty (length {n})")
        self.n = n
        self.rank = rank
        self.world_size = world_size
        self.global_batch = global_batch
        self.seed = seed
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(self.seed + epoch)

    def _global_order(self) -> Tensor:
        if self.shuffle:
            order = torch.randperm(self.n, generator=self.generator)
        else:
            order = torch.arange(self.n)
        b = self.global_batch
        if self.n >= b:
            return order[: self.n // b * b]
        reps = -(-b // self.n)
        return order.repeat(reps)[:b]

    def __iter__(self):
        return iter(self._global_order()[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        total = self.n // self.global_batch * self.global_batch or self.global_batch
        return total // self.world_size


__all__ = ["RankShardSampler", "ShardedBatches", "shard_batch"]
