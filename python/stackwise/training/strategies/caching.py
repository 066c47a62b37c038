"""``CacheManager``: boundary activations of the frozen trunk, computed once and read back while
the next stack trains (the documented API on top of :class:`stackwise._C.ActivationCacheStore`).

    cache_manager = CacheManager(cache_mode="fusion", max_cache_size=1000)
    cache_manager.store_activations(block_idx, activations, masks)
    activations = cache_manager.get_activations(block_idx)

Entries are keyed by ``(block_idx, batch_id)``: the activations *leaving* block ``block_idx``
(the input of block ``block_idx + 1``) for one batch. Which boundaries a trainer keeps is the
``cache_mode``; a boundary is described by the coarsest kind it is (see :data:`BOUNDARY_KINDS`):

- ``"layerwise"``: after every block (kinds ``block``, ``fusion``, ``stack``, ``rack``); the most
  memory, lets any block be retrained alone.
- ``"fusion"``: after each fused group of blocks (``fusion``, ``stack``, ``rack``): what the fusion
  trainer reads when it trains one group on top of a frozen prefix.
- ``"stack"``: after each stack (``stack``, ``rack``): one boundary per stack of the rack.
- ``"rack"``: only the current end of the trained rack (``rack``). Storing activations for a new
  block index makes it the current boundary and deliberately releases the previous boundary's
  entries (and spill files): the next stack only ever reads the newest boundary.

``max_cache_size`` is the number of entries held in host memory and ``max_memory_mb`` their
bytes; beyond either, least-recently-used entries spill to ``spill_dir`` (checksummed files), or,
with no spill directory, storing raises :class:`~stackwise.exceptions.CacheBudgetError` (nothing is
ever dropped to make room). ``storage_precision`` ("as_is", "fp16", "bf16", "int8", "fp8")
compresses the activations (masks are kept exactly); ``memory_stats()`` reports the error.

A ``CacheManager`` may be used from several threads: its batch bookkeeping is guarded by a lock
(each stored batch gets its own id) and the store underneath is thread-safe.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from stackwise import precision as _precision
from stackwise._C import ActivationCacheStore
from stackwise.exceptions import ConfigurationError

CACHE_MODES = ("stack", "rack", "fusion", "layerwise")
# Boundary kinds from finest to coarsest; a mode keeps its own kind and every coarser one.
BOUNDARY_KINDS = ("block", "fusion", "stack", "rack")
_MODE_FINEST = {"layerwise": "block", "fusion": "fusion", "stack": "stack", "rack": "rack"}
_MASKS = "masks"


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"must be an integer >= {minimum}, got {value!r}", key=name)
    return value


class CacheManager:
    """Keeps boundary activations (and their masks) per ``(block_idx, batch_id)``.

    Args:
        cache_mode: which boundaries are kept, one of :data:`CACHE_MODES` (module docstring).
        max_cache_size: entries held in host memory before spilling (>= 1).
        max_memory_mb: host-memory budget in MiB for the cached tensors, or None for none.
        storage_precision: "as_is", "fp16", "bf16", "int8" or "fp8"
            (:data:`stackwise.precision.CACHE_STORAGE` and its aliases).
        spill_dir: directory for entries beyond the budgets; None keeps everything in memory
            and makes a store over budget raise ``CacheBudgetError``.
        pinned_memory_mb: page-locked host memory for faster device copies (CUDA only).
    """

    def __init__(
        self,
        cache_mode: str = "fusion",
        max_cache_size: int = 1000,
        max_memory_mb: float | None = None,
        storage_precision: str = "as_is",
        spill_dir: str | os.PathLike[str] | None = None,
        pinned_memory_mb: float = 0,
    ) -> None:
        if cache_mode not in CACHE_MODES:
            raise ConfigurationError(
                f"must be one of {', '.join(CACHE_MODES)}, got {cache_mode!r}", key="cache_mode"
            )
        _check_int(max_cache_size, "max_cache_size", 1)
        if max_memory_mb is not None and (
            isinstance(max_memory_mb, bool)
            or not isinstance(max_memory_mb, int | float)
            or not max_memory_mb > 0
        ):
            raise ConfigurationError(
                f"must be a positive number of MiB or None, got {max_memory_mb!r}",
                key="max_memory_mb",
            )
        storage = _precision.canonical(
            storage_precision, _precision.CACHE_STORAGE, key="storage_precision"
        )
        if spill_dir is not None and not isinstance(spill_dir, str | os.PathLike):
            raise ConfigurationError(f"must be a path or None, got {spill_dir!r}", key="spill_dir")
        if not isinstance(pinned_memory_mb, int | float) or pinned_memory_mb < 0:
            raise ConfigurationError(
                f"must be a number of MiB >= 0, got {pinned_memory_mb!r}", key="pinned_memory_mb"
            )
        self.cache_mode = cache_mode
        self.max_cache_size = max_cache_size
        self.max_memory_mb = max_memory_mb
        self.storage_precision = _precision.PRECISIONS[storage].cache_format
        self.spill_dir = None if spill_dir is None else os.fspath(spill_dir)
        self._store = ActivationCacheStore(
            max_memory_bytes=0 if max_memory_mb is None else int(max_memory_mb * 2**20),
            max_entries=max_cache_size,
            storage_precision=self.storage_precision,
            spill_dir=self.spill_dir,
            pinned_bytes=int(pinned_memory_mb * 2**20),
        )
        # block_idx -> {batch_id: None}, in the order batches were stored (dicts keep it).
        self._batches: dict[int, dict[int, None]] = {}
        self._next_batch: dict[int, int] = {}
        self._rack_block: int | None = None
        self._lock = threading.RLock()  # guards the three above

    # ---- which boundaries ---------------------------------------------------------------------
    def should_cache(self, boundary_kind: str) -> bool:
        """Whether this mode keeps a boundary of ``boundary_kind`` ("block", "fusion", "stack"
        or "rack": the coarsest thing that ends there)."""
        if boundary_kind not in BOUNDARY_KINDS:
            raise ConfigurationError(
                f"must be one of {', '.join(BOUNDARY_KINDS)}, got {boundary_kind!r}",
                key="boundary_kind",
            )
        finest = BOUNDARY_KINDS.index(_MODE_FINEST[self.cache_mode])
        return BOUNDARY_KINDS.index(boundary_kind) >= finest

    # ---- storing and reading -----------------------------------------------------------------
    def store_activations(
        self,
        block_idx: int,
        activations: Tensor,
        masks: Tensor | None = None,
        batch_id: int | None = None,
    ) -> int:
        """Caches the activations leaving ``block_idx`` for one batch (and its masks).

        ``batch_id`` defaults to the next unused id for that block (0, 1, ...); storing an
        existing id replaces it and makes it the most recent. Returns the batch id used.
        """
        _check_int(block_idx, "block_idx", 0)
        if not isinstance(activations, Tensor):
            raise TypeError(f"activations must be a torch.Tensor, got {type(activations).__name__}")
        if masks is not None and not isinstance(masks, Tensor):
            raise TypeError(f"masks must be a torch.Tensor or None, got {type(masks).__name__}")
        if batch_id is not None:
            _check_int(batch_id, "batch_id", 0)
        with self._lock:
            if batch_id is None:  # reserved now, so that no other thread takes the same id
                batch_id = self._next_batch.get(block_idx, 0)
            reserved = self._next_batch.get(block_idx, 0)
            self._next_batch[block_idx] = max(reserved, batch_id + 1)
            if self.cache_mode == "rack" and self._rack_block not in (None, block_idx):
                self.evict(self._rack_block)  # the rack grew: the old boundary is no longer read
        companions = {} if masks is None else {_MASKS: masks}
        try:
            self._store.put(block_idx, batch_id, activations, companions)
        except BaseException:
            with self._lock:  # nothing was stored: give the id back unless a later one is out
                if self._next_batch.get(block_idx) == batch_id + 1 and reserved <= batch_id:
                    self._next_batch[block_idx] = reserved
            raise
        with self._lock:
            batches = self._batches.setdefault(block_idx, {})
            batches.pop(batch_id, None)
            batches[batch_id] = None
            if self.cache_mode == "rack":
                self._rack_block = block_idx
        return batch_id

    def _resolve(self, block_idx: int, batch_id: int | None) -> int:
        with self._lock:
            return self._resolve_locked(block_idx, batch_id)

    def _resolve_locked(self, block_idx: int, batch_id: int | None) -> int:
        batches = self._batches.get(block_idx)
        if not batches:
            cached = sorted(b for b, v in self._batches.items() if v)
            raise KeyError(
                f"no activations cached for block {block_idx} (blocks with cached batches: "
                f"{cached or 'none'}; cache_mode={self.cache_mode!r})"
            )
        if batch_id is None:
            return next(reversed(batches))
        if batch_id not in batches:
            ids = list(batches)
            shown = ids if len(ids) <= 10 else ids[:5] + ["..."] + ids[-3:]
            raise KeyError(
                f"no activations cached for block {block_idx}, batch {batch_id} "
                f"(cached batch ids: {shown})"
            )
        return batch_id

    def get_activations(
        self, block_idx: int, batch_id: int | None = None, device: str | torch.device | None = None
    ) -> Tensor:
        """The activations stored for ``(block_idx, batch_id)``; without ``batch_id`` the most
        recently stored batch of that block. On CPU unless ``device`` is given."""
        bid = self._resolve(block_idx, batch_id)
        return self._store.get(block_idx, bid, device)[0]

    def get_masks(
        self, block_idx: int, batch_id: int | None = None, device: str | torch.device | None = None
    ) -> Tensor | None:
        """The masks stored with that batch, or None when it was stored without masks."""
        bid = self._resolve(block_idx, batch_id)
        return self._store.get(block_idx, bid, device)[1].get(_MASKS)

    def get_batch(
        self,
        block_idx: int,
        batch_id: int | None = None,
        device: str | torch.device | None = None,
        release: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``(activations, masks)`` of one batch in a single read of the store (what a trainer
        wants: ``get_activations`` then ``get_masks`` would decode the activations twice).

        ``release=True`` is for a reader that scans the batches once per pass over a cache larger
        than its memory budget (the trainers): a batch that has a spill file leaves memory when
        read (the file stays) and, stored as-is, is handed over without a copy, so reading it
        pushes out nothing, in particular not the batches read ahead. Batches held only in
        memory are unaffected."""
        bid = self._resolve(block_idx, batch_id)
        value, companions, _ = self._store.get(block_idx, bid, device, release)
        return value, companions.get(_MASKS)

    def prefetch(self, block_idx: int, batch_ids: list[int]) -> None:
        """Starts reading those batches of ``block_idx`` back from the spill directory on the
        store's background thread, so that a later get finds them in memory. Batches already in
        memory, or already queued, are skipped; unknown batch ids raise ``KeyError``."""
        for bid in batch_ids:
            self._resolve(block_idx, bid)
        self._store.prefetch([(block_idx, bid) for bid in batch_ids])

    def iter_batches(
        self, block_idx: int, device: str | torch.device | None = None, prefetch: int = 2
    ) -> Iterator[tuple[int, Tensor, Tensor | None]]:
        """Yields ``(batch_id, activations, masks)`` for every batch of ``block_idx`` in the order
        they were stored, reading the next ``prefetch`` spilled batches ahead in the background."""
        with self._lock:
            self._resolve_locked(block_idx, None)
            ids = list(self._batches[block_idx])
        _check_int(prefetch, "prefetch", 0)
        for i, bid in enumerate(ids):
            if prefetch:
                self._store.prefetch([(block_idx, b) for b in ids[i + 1 : i + 1 + prefetch]])
            value, companions, _ = self._store.get(block_idx, bid, device)
            yield bid, value, companions.get(_MASKS)

    def batch_ids(self, block_idx: int) -> list[int]:
        """Cached batch ids of a block, in the order they were stored."""
        with self._lock:
            return list(self._batches.get(block_idx, {}))

    def blocks(self) -> list[int]:
        """Block indices with cached batches."""
        with self._lock:
            return sorted(b for b, v in self._batches.items() if v)

    def has_activations(self, block_idx: int, batch_id: int | None = None) -> bool:
        with self._lock:
            batches = self._batches.get(block_idx, {})
            return bool(batches) if batch_id is None else batch_id in batches

    # ---- housekeeping ------------------------------------------------------------------------
    def evict(self, block_idx: int, batch_id: int | None = None) -> None:
        """Removes one batch, or every batch of ``block_idx`` when ``batch_id`` is None."""
        with self._lock:
            if batch_id is not None:
                self._resolve_locked(block_idx, batch_id)
                self._store.evict(block_idx, batch_id)
                del self._batches[block_idx][batch_id]
                return
            for bid in list(self._batches.get(block_idx, {})):
                self._store.evict(block_idx, bid)
            self._batches.pop(block_idx, None)
            if self._rack_block == block_idx:
                self._rack_block = None

    def memory_stats(self) -> dict[str, Any]:
        """The store's statistics (bytes in memory / pinned / on disk, entries, hits, misses,
        spills, prefetch hits, compression error) plus MiB figures and batches per block."""
        stats = dict(self._store.stats())
        stats["memory_mb"] = stats["bytes_in_memory"] / 2**20
        stats["disk_mb"] = stats["bytes_on_disk"] / 2**20
        stats["cache_mode"] = self.cache_mode
        with self._lock:
            stats["batches_per_block"] = {b: len(v) for b, v in sorted(self._batches.items()) if v}
        return stats

    def clear(self) -> None:
        """Removes every cached batch (and spill file)."""
        with self._lock:
            self._store.clear()
            self._batches.clear()
            self._next_batch.clear()
            self._rack_block = None

    def close(self) -> None:
        """Releases the store and removes the spill files it wrote."""
        self._store.close()

    def __enter__(self) -> CacheManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"CacheManager(cache_mode={self.cache_mode!r}, max_cache_size={self.max_cache_size}, "
            f"max_memory_mb={self.max_memory_mb}, storage_precision={self.storage_precision!r}, "
            f"spill_dir={self.spill_dir!r})"
        )
