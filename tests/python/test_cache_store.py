"""stackwise._C.ActivationCacheStore: round trips at every storage precision and dtype, spilling,
budgets, corruption and truncation of spill files, a writer killed mid-spill, reopening,
prefetch, threads, and the CUDA paths (skipped without a GPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import stackwise
from stackwise.exceptions import CacheBudgetError, CacheCorruptionError
from stackwise.ops import quant
from utils import CUDA_SKIP_REASON, HAS_CUDA

ActivationCacheStore = stackwise._C.ActivationCacheStore
PRECISIONS = ["as_is", "fp16", "bf16", "int8", "fp8"]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OTHERS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
REPO = Path(__file__).resolve().parents[2]


def _sample(dtype: torch.dtype, shape=(6, 40), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


def _expected(x: torch.Tensor, precision: str) -> torch.Tensor:
    """What the store must return: the same conversion the stackwise ops make."""
    if not x.dtype.is_floating_point or precision == "as_is" or x.numel() == 0:
        return x
    if precision in ("fp16", "bf16"):
        return x.to(torch.float16 if precision == "fp16" else torch.bfloat16).to(x.dtype)
    rows = x.reshape(-1, x.shape[-1] if x.dim() else 1)
    if precision == "int8":
        q, s = quant.quantize_int8(rows)
        return quant.dequantize_int8(q, s, x.dtype).reshape(x.shape)
    q, s = quant.quantize_fp8(rows, "e4m3")
    return quant.dequantize_fp8(q, s, x.dtype).reshape(x.shape)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", FLOATS + OTHERS, ids=str)
def test_round_trip(precision, dtype, tmp_path):
    store = ActivationCacheStore(storage_precision=precision, spill_dir=tmp_path)
    x = _sample(dtype)
    mask = torch.rand(6) > 0.3
    store.put(1, 2, x, {"mask": mask}, {"split": "train"})
    value, companions, meta = store.get(1, 2)
    assert value.dtype == x.dtype and value.shape == x.shape
    assert torch.equal(value, _expected(x, precision))
    assert torch.equal(companions["mask"], mask) and meta == {"split": "train"}
    lossless = precision == "as_is" or not dtype.is_floating_point
    lossless |= (precision, dtype) in (("fp16", torch.float16), ("bf16", torch.bfloat16))
    if lossless:
        assert torch.equal(value, x)
        assert store.stats()["compression_max_abs_error"] == 0.0
    else:
        err = (value.double() - x.double()).abs()
        absmax = x.double().abs().amax(dim=-1, keepdim=True)
        bound = {
            "fp16": x.double().abs() * 2**-11 + 2**-24,
            "bf16": x.double().abs() * 2**-8 + 1e-30,
            # half a step of the row's scale, plus rounding to a half-precision output dtype
            "int8": absmax / 254 * (1 + 1e-6) + x.double().abs() * 2**-7,
            "fp8": x.double().abs() * 2**-4 + absmax / 448 * 2**-9 + x.double().abs() * 2**-7,
        }[precision]
        assert bool((err <= bound).all()), float((err - bound).max())
        stats = store.stats()
        assert stats["compression_max_abs_error"] == pytest.approx(float(err.max()), rel=1e-6)
        rms = float(err.square().mean().sqrt())
        assert stats["compression_rms_error"] == pytest.approx(rms, rel=1e-5)
    # The same values after a trip through a spill file (a store reopens a directory whose
    # writer has closed: a live store's files stay its own).
    store.flush()
    store.put(9, 9, torch.zeros(1))
    store.close(keep_files=True)
    reopened = ActivationCacheStore.open(tmp_path)
    assert torch.equal(reopened.get(1, 2)[0], value)
    reopened.clear()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", [(), (7,), (3, 0), (2, 3, 5), (1, 1)], ids=str)
def test_odd_shapes_and_non_contiguous(precision, shape):
    store = ActivationCacheStore(storage_precision=precision)
    x = torch.randn(shape)
    store.put(0, 0, x)
    assert torch.equal(store.get(0, 0)[0], _expected(x, precision))
    y = torch.randn(5, 8).t()  # non-contiguous
    store.put(0, 1, y)
    out = store.get(0, 1)[0]
    assert out.is_contiguous() and torch.equal(out, _expected(y.contiguous(), precision))


@pytest.mark.parametrize("precision", ["as_is", "int8"])
def test_spill_under_tiny_budget_returns_identical_tensors(precision, tmp_path):
    store = ActivationCacheStore(
        max_memory_bytes=4096, storage_precision=precision, spill_dir=tmp_path
    )
    reference = ActivationCacheStore(storage_precision=precision)
    xs = [torch.randn(16, 64) for _ in range(12)]
    for i, x in enumerate(xs):
        store.put(3, i, x, {"ids": torch.arange(16) + i})
        reference.put(3, i, x)
    stats = store.stats()
    assert stats["spills"] >= 8 and stats["bytes_in_memory"] <= 4096
    assert stats["entries"] == 12 and stats["entries_on_disk"] >= 8
    for i in reversed(range(12)):
        value, comp, _ = store.get(3, i)
        assert torch.equal(value, reference.get(3, i)[0])
        assert torch.equal(comp["ids"], torch.arange(16) + i)
    assert store.stats()["misses"] >= 8
    store.close()
    assert not list(tmp_path.glob("*.swspill"))


def test_put_over_budget_without_spill_dir_raises_and_keeps_entries():
    store = ActivationCacheStore(max_memory_bytes=3000)
    a, b = torch.randn(256), torch.randn(256)
    store.put(0, 0, a)
    store.put(0, 1, b)
    with pytest.raises(CacheBudgetError, match="no spill directory"):
        store.put(0, 2, torch.randn(256))
    assert len(store) == 2 and torch.equal(store.get(0, 0)[0], a)
    counted = ActivationCacheStore(max_entries=1)
    counted.put(0, 0, a)
    with pytest.raises(CacheBudgetError, match="max_entries=1"):
        counted.put(0, 1, b)


def _spilled_file(tmp_path: Path) -> tuple[ActivationCacheStore, Path]:
    store = ActivationCacheStore(max_entries=1, spill_dir=tmp_path)
    store.put(0, 0, torch.randn(64, 64))
    store.put(0, 1, torch.randn(64, 64))
    (path,) = tmp_path.glob("blk0_batch0.*.swspill")
    return store, path


def test_flipped_byte_raises_cache_corruption_error_naming_file(tmp_path):
    store, path = _spilled_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptionError, match="checksum") as info:
        store.get(0, 0)
    assert info.value.path == str(path) and str(path) in str(info.value)
    assert store.contains(0, 0)  # reported, not silently dropped or used
    assert store.get(0, 1)[0].shape == (64, 64)  # the other entry is unaffected


def test_truncated_file_raises(tmp_path):
    store, path = _spilled_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CacheCorruptionError, match="truncated") as info:
        store.get(0, 0)
    assert info.value.path == str(path)
    store.close(keep_files=True)
    with pytest.raises(CacheCorruptionError, match="truncated"):
        ActivationCacheStore.open(tmp_path)


def test_foreign_file_raises_on_open(tmp_path):
    path = tmp_path / "blk4_batch1.00000000000000ab-1.swspill"
    path.write_bytes(b"PK\x03\x04" + os.urandom(500))
    with pytest.raises(CacheCorruptionError, match="magic") as info:
        ActivationCacheStore.open(tmp_path)
    assert info.value.path == str(path)
    (tmp_path / "notes.txt").write_text("unrelated files are left alone")
    path.unlink()
    assert len(ActivationCacheStore.open(tmp_path)) == 0


def test_reopen_finds_entries(tmp_path):
    xs = {(b, n): torch.randn(32, 16) for b in range(2) for n in range(3)}
    store = ActivationCacheStore(max_entries=2, storage_precision="bf16", spill_dir=tmp_path)
    for (b, n), x in xs.items():
        store.put(b, n, x, {"mask": x > 0}, {"n": str(n)})
    store.close(keep_files=True)
    reopened = ActivationCacheStore.open(tmp_path, max_entries=2)
    assert sorted(reopened.keys()) == sorted(xs)
    for (b, n), x in xs.items():
        value, comp, meta = reopened.get(b, n)
        assert torch.equal(value, x.bfloat16().float()) and torch.equal(comp["mask"], x > 0)
        assert meta == {"n": str(n)}
    reopened.close()  # files it did not write stay
    assert len(list(tmp_path.glob("*.swspill"))) == 6
    ActivationCacheStore.open(tmp_path).clear()
    assert not list(tmp_path.glob("*.swspill"))


_KILLED_WRITER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {python!r})
    from stackwise._C import ActivationCacheStore
    store = ActivationCacheStore(max_entries=1, spill_dir={dir!r})
    n = 0
    while True:
        # 48 MiB entries: each spill takes long enough to be killed in the middle of it
        store.put(0, n, torch.full((48, 2**18), float(n)))
        n += 1
    """
)


def test_killed_writer_leaves_no_corrupt_entry(tmp_path):
    spill = tmp_path / "spill"
    spill.mkdir()
    code = _KILLED_WRITER.format(python=str(REPO / "python"), dir=str(spill))
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 120
        # Wait until a spill is in progress (its temporary file exists), after a few completed.
        while time.monotonic() < deadline:
            done = list(spill.glob("*.swspill"))
            if len(done) >= 2 and list(spill.glob(".tmp-*")):
                break
            time.sleep(0.002)
        else:
            pytest.fail("the writer never started a spill")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    store = ActivationCacheStore.open(spill)
    assert len(store) >= 2
    for block, batch in store.keys():
        value = store.get(block, batch)[0]
        assert value.shape == (48, 2**18) and bool((value == batch).all())
    assert not list(spill.glob(".tmp-*"))  # the interrupted write was never visible


def test_prefetch_then_get(tmp_path):
    store = ActivationCacheStore(max_entries=2, spill_dir=tmp_path)
    xs = [torch.randn(64, 64) for _ in range(8)]
    for i, x in enumerate(xs):
        store.put(0, i, x)
    store.prefetch([(0, 0), (0, 1), (5, 5)])
    store.wait_prefetch()
    assert torch.equal(store.get(0, 0)[0], xs[0]) and torch.equal(store.get(0, 1)[0], xs[1])
    stats = store.stats()
    assert stats["prefetch_hits"] == 2 and stats["misses"] == 0 and stats["prefetch_errors"] == 0


def test_store_api_and_errors(tmp_path):
    store = ActivationCacheStore(spill_dir=tmp_path / "new" / "dir")
    assert store.spill_dir == str(tmp_path / "new" / "dir")
    store.put(0, 0, torch.ones(3))
    assert store.contains(0, 0) and (0, 0) in store and not store.contains(0, 1)
    with pytest.raises(KeyError, match=r"block 0, batch 1"):
        store.get(0, 1)
    with pytest.raises(KeyError):
        store.evict(0, 1)
    store.evict(0, 0)
    assert len(store) == 0 and store.stats()["not_found"] == 1
    with pytest.raises(ValueError, match="storage_precision"):
        ActivationCacheStore(storage_precision="int4")
    with pytest.raises(ValueError, match="max_memory_bytes"):
        ActivationCacheStore(max_memory_bytes=-1)
    with pytest.raises(TypeError, match="ComplexFloat cannot be stored"):
        store.put(0, 0, torch.zeros(2, dtype=torch.complex64))
    store.put(0, 0, torch.randn(4, requires_grad=True))  # stored detached
    store.close()
    assert store.closed
    with pytest.raises(RuntimeError, match="closed"):
        store.get(0, 0)


def test_concurrent_threads(tmp_path):
    store = ActivationCacheStore(max_entries=4, storage_precision="fp16", spill_dir=tmp_path)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(30):
                x = torch.full((64, 32), float(t * 100 + i))
                store.put(t, i, x)
                if i >= 2:
                    store.prefetch([(t, i - 2)])
                assert torch.equal(store.get(t, i)[0], x)
                assert bool((store.get(t, i // 2)[0] == t * 100 + i // 2).all())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(store) == 120


cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("pinned", [0, 1 << 26])
def test_cuda_put_and_get(precision, pinned, tmp_path):
    store = ActivationCacheStore(
        max_entries=2, storage_precision=precision, spill_dir=tmp_path, pinned_bytes=pinned
    )
    xs = [torch.randn(128, 256, device="cuda") for _ in range(4)]
    for i, x in enumerate(xs):
        x_host = x.cpu()
        store.put(0, i, x, {"mask": x > 0})
        x.add_(1)  # the store copied the values before returning
        xs[i] = x_host
    for i, x in enumerate(xs):
        value, comp, _ = store.get(0, i, device="cuda")
        assert value.is_cuda and comp["mask"].is_cuda
        torch.testing.assert_close(value.cpu(), _expected(x, precision), rtol=0, atol=0)
        assert torch.equal(store.get(0, i)[0], value.cpu())
    if pinned:
        assert store.stats()["bytes_pinned"] > 0


def test_module_exports():
    assert stackwise._C.ActivationCacheStore is ActivationCacheStore


def test_dropping_the_store_removes_its_files(tmp_path):
    store = ActivationCacheStore(max_entries=1, spill_dir=tmp_path)
    for i in range(3):
        store.put(0, i, torch.randn(8))
    assert len(list(tmp_path.glob("*.swspill"))) == 2
    del store
    assert not list(tmp_path.glob("*.swspill"))


def test_fp16_encode_with_error_stats_matches_torch_rounding():
    # Several parallel chunks and a tail that is not a multiple of the vector width; values
    # that round to subnormals, overflow to inf, and ties.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3 * 65536 + 13, generator=g) * 4
    x[:5] = torch.tensor([1e-6, 7e4, -7e4, 1.0 + 2**-11, 3e-8])
    x[-3:] = torch.tensor([65519.0, -1e-7, 2.0**-14])
    store = ActivationCacheStore(storage_precision="fp16", track_error=True)
    store.put(0, 0, x)
    value = store.get(0, 0)[0]
    assert torch.equal(value, x.half().float())
    finite = torch.isfinite(x.half())
    assert not bool(finite.all())  # the overflowing values make the max error infinite
    assert store.stats()["compression_max_abs_error"] == float("inf")
    y = x[finite]
    store.put(0, 1, y)
    err = (y.half().double() - y.double()).abs()
    stats = store.stats()
    assert stats["compression_elements"] == x.numel() + y.numel()
    store2 = ActivationCacheStore(storage_precision="fp16", track_error=True)
    store2.put(0, 0, y)
    s2 = store2.stats()
    assert s2["compression_max_abs_error"] == pytest.approx(float(err.max()), rel=1e-6)
    assert s2["compression_rms_error"] == pytest.approx(float(err.square().mean().sqrt()), rel=1e-5)


def test_get_with_release_hands_over_and_keeps_the_file(tmp_path):
    xs = [torch.randn(32, 16) for _ in range(3)]
    with ActivationCacheStore(spill_dir=tmp_path) as w:
        for i, x in enumerate(xs):
            w.put(0, i, x, {"ids": torch.arange(32)})
        w.close(keep_files=True)
    store = ActivationCacheStore.open(tmp_path, max_entries=2)
    store.prefetch([(0, 0)])
    store.wait_prefetch()
    value, comp, _ = store.get(0, 0, release=True)  # read ahead: handed over, no copy
    assert torch.equal(value, xs[0]) and torch.equal(comp["ids"], torch.arange(32))
    assert store.stats()["entries_in_memory"] == 0 and store.stats()["released"] == 1
    value.fill_(7.0)  # the caller owns it: the store's copy (the file) is untouched
    assert torch.equal(store.get(0, 0)[0], xs[0])
    value, _, _ = store.get(0, 1, release=True)  # read for this get, never installed
    assert torch.equal(value, xs[1]) and store.stats()["entries_in_memory"] == 1
    store.put(1, 0, xs[2])  # memory only: kept, and what get returns is a copy
    got = store.get(1, 0, release=True)[0]
    got.zero_()
    assert torch.equal(store.get(1, 0)[0], xs[2])
    store.close()
