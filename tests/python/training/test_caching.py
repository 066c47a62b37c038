"""CacheManager: the documented API, cache modes, batches in order, spilling through the native
store, and argument errors."""

from __future__ import annotations

import pytest
import torch

from stackwise.exceptions import CacheBudgetError, ConfigurationError
from stackwise.training.strategies.caching import CACHE_MODES, CacheManager


def test_documented_example():
    cache_manager = CacheManager(cache_mode="fusion", max_cache_size=1000)
    activations = torch.randn(2, 16, 32)
    masks = torch.rand(2, 16) > 0.2
    cache_manager.store_activations(3, activations, masks)
    assert torch.equal(cache_manager.get_activations(3), activations)
    assert torch.equal(cache_manager.get_masks(3), masks)


def test_most_recent_batch_and_explicit_ids():
    cm = CacheManager()
    xs = [torch.randn(4, 8) for _ in range(3)]
    ids = [cm.store_activations(0, x) for x in xs]
    assert ids == [0, 1, 2]
    assert torch.equal(cm.get_activations(0), xs[2])
    assert torch.equal(cm.get_activations(0, batch_id=1), xs[1])
    assert cm.get_masks(0) is None
    y = torch.randn(4, 8)
    cm.store_activations(0, y, batch_id=0)  # replacing makes it the most recent
    assert torch.equal(cm.get_activations(0), y)
    assert cm.batch_ids(0) == [1, 2, 0]
    assert cm.store_activations(0, y) == 3


def test_iter_batches_in_order_with_spilling(tmp_path):
    cm = CacheManager(max_cache_size=2, spill_dir=tmp_path, storage_precision="as_is")
    xs = {bid: torch.randn(8, 16) for bid in (5, 2, 9, 0, 7)}
    for bid, x in xs.items():
        cm.store_activations(1, x, masks=x > 0, batch_id=bid)
    assert cm.memory_stats()["entries_on_disk"] >= 3
    seen = []
    for bid, value, masks in cm.iter_batches(1):
        seen.append(bid)
        assert torch.equal(value, xs[bid]) and torch.equal(masks, xs[bid] > 0)
    assert seen == [5, 2, 9, 0, 7]
    assert cm.memory_stats()["prefetch_requests"] >= 1
    cm.close()
    assert not list(tmp_path.glob("*.swspill"))


def test_missing_entries_raise_helpful_key_errors():
    cm = CacheManager()
    with pytest.raises(KeyError, match="no activations cached for block 4"):
        cm.get_activations(4)
    cm.store_activations(2, torch.zeros(3))
    with pytest.raises(KeyError, match=r"blocks with cached batches: \[2\]"):
        cm.get_masks(4)
    with pytest.raises(KeyError, match=r"batch 7 \(cached batch ids: \[0\]\)"):
        cm.get_activations(2, batch_id=7)


@pytest.mark.parametrize(
    ("mode", "kept"),
    [
        ("layerwise", {"block", "fusion", "stack", "rack"}),
        ("fusion", {"fusion", "stack", "rack"}),
        ("stack", {"stack", "rack"}),
        ("rack", {"rack"}),
    ],
)
def test_should_cache(mode, kept):
    cm = CacheManager(cache_mode=mode)
    assert {k for k in ("block", "fusion", "stack", "rack") if cm.should_cache(k)} == kept
    with pytest.raises(ConfigurationError, match="boundary_kind"):
        cm.should_cache("layer")


def test_rack_mode_keeps_only_the_current_boundary():
    cm = CacheManager(cache_mode="rack")
    cm.store_activations(3, torch.randn(2, 4))
    cm.store_activations(3, torch.randn(2, 4))
    cm.store_activations(7, torch.randn(2, 4))  # the rack grew
    assert cm.blocks() == [7]
    assert cm.memory_stats()["entries"] == 1


def test_lossy_precision_reports_error_and_memory_stats():
    cm = CacheManager(storage_precision="int8", max_memory_mb=16)
    x = torch.randn(64, 128)
    cm.store_activations(0, x)
    stats = cm.memory_stats()
    assert 0 < stats["compression_max_abs_error"] <= float(x.abs().amax()) / 254 * 1.0001
    assert stats["bytes_in_memory"] == 64 * 128 + 64 * 4
    assert stats["batches_per_block"] == {0: 1} and stats["cache_mode"] == "fusion"
    assert stats["storage_precision"] == "int8"


def test_budget_without_spill_dir_raises():
    cm = CacheManager(max_cache_size=2)
    cm.store_activations(0, torch.zeros(4))
    cm.store_activations(0, torch.zeros(4))
    with pytest.raises(CacheBudgetError):
        cm.store_activations(0, torch.zeros(4))
    assert cm.batch_ids(0) == [0, 1]


def test_evict_and_clear(tmp_path):
    cm = CacheManager(max_cache_size=1, spill_dir=tmp_path)
    for b in range(3):
        cm.store_activations(b, torch.randn(4))
    cm.evict(1)
    assert cm.blocks() == [0, 2] and not cm.has_activations(1)
    cm.store_activations(2, torch.randn(4))
    cm.evict(2, batch_id=0)
    assert cm.batch_ids(2) == [1]
    cm.clear()
    assert cm.blocks() == [] and cm.memory_stats()["entries"] == 0
    assert not list(tmp_path.glob("*.swspill"))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"cache_mode": "layers"}, "cache_mode"),
        ({"max_cache_size": 0}, "max_cache_size"),
        ({"max_cache_size": 2.5}, "max_cache_size"),
        ({"max_memory_mb": -1}, "max_memory_mb"),
        ({"storage_precision": "nf4"}, "storage_precision"),
        ({"spill_dir": 3}, "spill_dir"),
        ({"pinned_memory_mb": -2}, "pinned_memory_mb"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, key):
    with pytest.raises(ConfigurationError, match=key) as info:
        CacheManager(**kwargs)
    assert info.value.key == key


def test_invalid_store_arguments():
    cm = CacheManager()
    with pytest.raises(ConfigurationError, match="block_idx"):
        cm.store_activations(-1, torch.zeros(2))
    with pytest.raises(ConfigurationError, match="batch_id"):
        cm.store_activations(0, torch.zeros(2), batch_id=-3)
    with pytest.raises(TypeError, match="activations"):
        cm.store_activations(0, [1, 2])
    assert set(CACHE_MODES) == {"stack", "rack", "fusion", "layerwise"}


def test_get_batch_and_prefetch(tmp_path):
    cm = CacheManager(max_cache_size=1, spill_dir=tmp_path, storage_precision="as_is")
    xs = [torch.randn(8, 16) for _ in range(4)]
    for x in xs:
        cm.store_activations(2, x, masks=x > 0)
    value, masks = cm.get_batch(2, 0)  # one store read gives both
    assert torch.equal(value, xs[0]) and torch.equal(masks, xs[0] > 0)
    assert cm.get_batch(2)[1] is not None  # most recent batch
    before = cm.memory_stats()
    cm.prefetch(2, [1, 2])
    cm._store.wait_prefetch()
    for bid in (1, 2):
        assert torch.equal(cm.get_activations(2, bid), xs[bid])
    after = cm.memory_stats()
    assert after["prefetch_requests"] - before["prefetch_requests"] == 2
    assert after["prefetch_hits"] - before["prefetch_hits"] >= 1  # budget 1: one may go again
    assert after["bytes_read"] > before["bytes_read"] and after["read_seconds"] > 0
    with pytest.raises(KeyError, match=r"batch 9"):
        cm.prefetch(2, [1, 9])
    with pytest.raises(KeyError, match="no activations cached for block 5"):
        cm.prefetch(5, [0])
    cm.store_activations(3, torch.zeros(2))  # no masks stored: get_batch gives None for them
    assert cm.get_batch(3)[1] is None
    cm.close()
