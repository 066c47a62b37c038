"""The activation cache under the conditions that used to lose or mix up entries: threads
replacing and reading entries (the store and CacheManager), two stores on one spill directory,
and a disk that refuses writes (RLIMIT_FSIZE: write() then fails with EFBIG, as a full disk
fails with ENOSPC)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import stackwise
from stackwise.exceptions import CacheCorruptionError
from stackwise.training.strategies.caching import CacheManager

ActivationCacheStore = stackwise._C.ActivationCacheStore
REPO = Path(__file__).resolve().parents[2]


def _value(key: int, round_: int) -> torch.Tensor:
    return torch.full((16, 16), float(key * 1000 + round_))


def _run_threads(targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - collected and reported by the test
                errors.append(e)

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_replacing_puts_and_gets_lose_nothing(tmp_path):
    store = ActivationCacheStore(max_entries=2, spill_dir=tmp_path)
    keys, rounds, writers = 12, 25, 3
    for k in range(keys):
        store.put(0, k, _value(k, 0))
    stop = threading.Event()

    def writer(w):
        def run():
            for r in range(1, rounds + 1):
                for k in range(w, keys, writers):
                    store.put(0, k, _value(k, r))

        return run

    def reader(seed):
        def run():
            i = seed
            while not stop.is_set():
                k = (i * 7) % keys
                got = store.get(0, k, None, i % 3 == 0)[0]
                assert float(got[0, 0]) // 1000 == k  # some round of this key, never another's
                i += 1

        return run

    def writers_then_stop():
        try:
            errors.extend(_run_threads([writer(w) for w in range(writers)]))
        finally:
            stop.set()

    errors: list[BaseException] = []
    errors += _run_threads([writers_then_stop] + [reader(s) for s in range(3)])
    assert not errors, errors[:3]
    assert sorted(store.keys()) == [(0, k) for k in range(keys)]
    for k in range(keys):
        assert torch.equal(store.get(0, k)[0], _value(k, rounds)), k
    assert len(list(tmp_path.glob("*.swspill"))) == store.stats()["entries_on_disk"]


def test_cache_manager_from_four_threads(tmp_path):
    cm = CacheManager(cache_mode="layerwise", max_cache_size=3, spill_dir=tmp_path)
    kept: dict[int, torch.Tensor] = {}
    lock = threading.Lock()

    def worker(t):
        def run():
            for i in range(30):
                value = _value(t, i)
                bid = cm.store_activations(0, value, torch.ones(4, dtype=torch.bool))
                assert torch.equal(cm.get_activations(0, bid), value)  # no other thread's id
                got, masks = cm.get_batch(0, bid)
                assert torch.equal(got, value) and masks is not None
                assert bid in cm.batch_ids(0) and cm.has_activations(0, bid)
                cm.get_activations(0)  # the newest batch, whichever thread stored it
                if i % 5 == 4:
                    cm.evict(0, bid)
                else:
                    with lock:
                        kept[bid] = value
                cm.memory_stats()
                cm.blocks()

        return run

    errors = _run_threads([worker(t) for t in range(4)])
    assert not errors, errors[:3]
    assert sorted(cm.batch_ids(0)) == sorted(kept) and len(kept) == 4 * 24
    for bid, value in kept.items():
        assert torch.equal(cm.get_activations(0, bid), value)
    cm.close()


def test_two_stores_on_one_spill_directory(tmp_path):
    a = ActivationCacheStore(max_entries=1, spill_dir=tmp_path)
    b = ActivationCacheStore(max_entries=1, spill_dir=tmp_path, storage_precision="fp16")
    for i in range(4):
        a.put(0, i, _value(1, i))
        b.put(0, i, _value(2, i))
    for i in range(4):
        assert torch.equal(a.get(0, i)[0], _value(1, i))
        assert torch.equal(b.get(0, i)[0], _value(2, i))
    a.close()
    for i in range(4):  # closing a removed only a's files
        assert torch.equal(b.get(0, i)[0], _value(2, i))
    b.close()
    assert not list(tmp_path.iterdir())  # spill files and lock files are gone


def test_spill_file_of_another_store_is_refused(tmp_path):
    a = ActivationCacheStore(max_entries=1, spill_dir=tmp_path / "a")
    b = ActivationCacheStore(max_entries=1, spill_dir=tmp_path / "b")
    for store, base in ((a, 1), (b, 2)):
        store.put(0, 0, _value(base, 0))
        store.put(0, 1, _value(base, 1))  # spills (0, 0)
    (mine,) = (tmp_path / "a").glob("blk0_batch0.*.swspill")
    (theirs,) = (tmp_path / "b").glob("blk0_batch0.*.swspill")
    mine.write_bytes(theirs.read_bytes())  # same key and shape, valid checksum, other writer
    with pytest.raises(CacheCorruptionError, match="not by store"):
        a.get(0, 0)


# Run in a process of its own: the lowered file-size limit would also fail pytest's own writes
# to its capture files.
_FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys, torch
    sys.path.insert(0, {python!r})
    from stackwise.training.strategies.caching import CacheManager

    def value(i):
        return torch.full((16, 16), float(i))

    cm = CacheManager(cache_mode="layerwise", max_cache_size=2, spill_dir={dir!r})
    for i in range(3):
        cm.store_activations(0, value(i))  # batch 0 spills
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))  # no spill file fits: a full disk
    try:
        cm.store_activations(0, value(3))  # needs a spill: the write fails
        raise SystemExit("the put succeeded")
    except OSError as e:
        print("put refused:", e)
    assert cm.batch_ids(0) == [0, 1, 2], cm.batch_ids(0)  # the failed batch is not listed ...
    assert not cm._store.contains(0, 3)  # ... and not stored
    for i in range(3):  # the spilled batch reads back although nothing can be written
        assert torch.equal(cm.get_activations(0, i), value(i)), i
    assert cm.memory_stats()["write_errors"] >= 1
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert cm.store_activations(0, value(3)) == 3  # room on disk again: the id is reused
    assert torch.equal(cm.get_activations(0, 3), value(3))
    cm.close()
    print("OK")
    """
)


def test_full_disk_put_stores_nothing_and_reads_still_work(tmp_path):
    code = _FULL_DISK.format(python=str(REPO / "python"), dir=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr[-3000:]
    assert "put refused:" in r.stdout
