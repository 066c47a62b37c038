"""Activation-cache store benchmark: stackwise._C.ActivationCacheStore against plain baselines.

Rows (one process, candidate and baseline interleaved; rates are bytes of the activation batch
per second, so "of baseline" = baseline time / our time):
  - in-memory put+get of a 64 MiB float32 batch, as-is and fp16 (with and without the error
    statistics), against one ``torch.Tensor.copy_`` of it (target: fp16 >= 50%);
  - spilled put+get (write, fsync, rename; read, CRC check) against ``torch.save`` + fsync +
    ``torch.load`` of the same tensor in the same directory;
  - spill write rate against ``dd bs=1M count=256 conv=fsync`` in the same directory, copying
    incompressible bytes (a random file in the page cache) into a new file as a spill does
    (target: >= 70%); dd from /dev/zero is reported beside it;
  - a trainer-like loop over spilled batches, read back from disk (page cache dropped for the
    files with posix_fadvise), where each step "uses" a batch for 1.5x the disk's read time per
    batch (sleep, standing for device compute) and then gets the next, reading ahead as the
    trainers do (``CachedSource``, ``get(..., release=True)``): the fraction of the loop spent in
    ``get``, median of ``--loop-runs`` loops, with the disk's read time per batch during the loop
    beside it (target: < 10% with prefetch);
  - on CUDA: put of a device tensor (device -> pinned) and get to the device (pinned ->
    device) against a plain pinned ``copy_`` each way (target: >= 70%).

    python bench/cache_store.py [--dir DIR] [--mb 64] [--repeat 7] [--batches 16]
                                [--prefetch-depth 2] [--loop-runs 5]
                                [--json bench/results/cache_store.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stackwise  # noqa: E402
from harness import Row, Timing, compare, environment, format_table, time_fn, write_json  # noqa: E402
from stackwise.training.batches import CachedSource  # noqa: E402

ActivationCacheStore = stackwise._C.ActivationCacheStore

MiB = 2**20


def _rate_extra(nbytes: int, ours: Timing, base: Timing) -> dict:
    return {
        "GB/s": nbytes / (ours.median_ms * 1e-3) / 1e9,
        "baseline GB/s": nbytes / (base.median_ms * 1e-3) / 1e9,
        "of baseline": base.median_ms / ours.median_ms,
    }


def bench_memory(x: torch.Tensor, repeat: int) -> list[Row]:
    nbytes = x.numel() * x.element_size()
    dst = torch.empty_like(x)
    rows = []
    for precision, track in (("as_is", True), ("fp16", True), ("fp16", False)):
        store = ActivationCacheStore(storage_precision=precision, track_error=track)

        def put_get(store=store):
            store.put(0, 0, x)
            return store.get(0, 0)

        ours, base = compare(put_get, lambda: dst.copy_(x), repeat=repeat)
        case = {"case": "put+get in memory", "precision": precision, "error stats": track}
        rows.append(Row(case, ours, base, "torch.Tensor.copy_", _rate_extra(nbytes, ours, base)))
    return rows


def bench_spill(x: torch.Tensor, root: Path, repeat: int) -> list[Row]:
    nbytes = x.numel() * x.element_size()
    store = ActivationCacheStore(max_memory_bytes=1, spill_dir=root / "spill")
    path = root / "torch_save.pt"

    def put_get():
        store.put(0, 0, x)  # larger than the budget: written straight to disk
        return store.get(0, 0)

    def save_load():
        with open(path, "wb") as f:
            torch.save(x, f)
            f.flush()
            os.fsync(f.fileno())
        return torch.load(path)

    ours, base = compare(put_get, save_load, warmup=1, repeat=repeat)
    rows = [
        Row(
            {"case": "put+get spilled", "precision": "as_is"},
            ours,
            base,
            "torch.save+fsync+torch.load",
            _rate_extra(nbytes, ours, base),
        )
    ]

    # Spill write alone against dd with fsync, 256 MiB per dd run, in two forms: the data a
    # spill writes (incompressible bytes, from a source file held in the page cache, into a new
    # file each time, as a spill creates one) and /dev/zero over one reused file. Storage that
    # detects zero blocks makes the second faster than any real write; both are reported and the
    # first is the baseline.
    source = root / "dd_source.bin"
    with open(source, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(MiB))
    source.read_bytes()  # into the page cache, so dd measures the write side
    counter = iter(range(10**9))
    dd_runs = iter(range(10**9))

    def spill_write():
        store.put(1, next(counter), x)

    def dd(src: str, dst: Path) -> None:
        subprocess.run(
            ["dd", f"if={src}", f"of={dst}", "bs=1M", "count=256", "conv=fsync"],
            check=True,
            capture_output=True,
        )

    def dd_random_new_file():
        dd(str(source), root / f"dd_{next(dd_runs)}.bin")

    ours, base = compare(spill_write, dd_random_new_file, warmup=1, repeat=repeat)
    zeros = time_fn(lambda: dd("/dev/zero", root / "dd_zero.bin"), warmup=1, repeat=repeat)
    ours_rate = nbytes / (ours.median_ms * 1e-3) / 1e9
    dd_rate = 256 * MiB / (base.median_ms * 1e-3) / 1e9
    zero_rate = 256 * MiB / (zeros.median_ms * 1e-3) / 1e9
    rows.append(
        Row(
            {"case": "spill write", "precision": "as_is"},
            ours,
            base,
            "dd if=<random file in page cache> of=<new file> bs=1M count=256 conv=fsync",
            {
                "GB/s": ours_rate,
                "baseline GB/s": dd_rate,
                "of baseline": ours_rate / dd_rate,
                "dd /dev/zero GB/s": zero_rate,
                "of dd /dev/zero": ours_rate / zero_rate,
            },
        )
    )
    store.close()
    for p in [source, *root.glob("dd_*.bin")]:
        p.unlink(missing_ok=True)
    return rows


def _drop_page_cache(directory: Path) -> None:
    for p in directory.glob("*.swspill"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_trainer_loop(
    x: torch.Tensor, root: Path, batches: int, depth: int, runs: int
) -> list[Row]:
    """Time a loop that gets batch i, uses it for `step` seconds, then gets batch i+1, with the
    batches on disk only (a store reopened on its spill directory, page cache dropped).

    The read-ahead and the reads are the trainers' own: a ``CachedSource`` asks for the next
    ``depth`` batches before each one is returned (and for the first ones when it is created),
    and each batch is read with ``release=True`` (handed over, no copy). Waiting is all the time
    spent in ``get``; the loop's first get waits on a read that starts when the source is
    created."""
    spill = root / "loop"
    store = ActivationCacheStore(max_entries=depth + 1, spill_dir=spill)
    for i in range(batches):
        store.put(0, i, x + i)
    store.close(keep_files=True)

    def reopen() -> ActivationCacheStore:
        s = ActivationCacheStore.open(spill, max_entries=depth + 1)
        _drop_page_cache(spill)
        return s

    # The step is 1.5x the disk's read time per batch over a whole cold pass, measured just
    # before: a disk slower than compute cannot be hidden by any read-ahead.
    s = reopen()
    reads = []
    for i in range(batches):
        t0 = time.perf_counter()
        s.get(0, i, release=True)
        reads.append(time.perf_counter() - t0)
    s.close(keep_files=True)
    cold = sorted(reads)[len(reads) // 2]
    step = 1.5 * cold

    def run(prefetch_depth: int) -> dict:
        s = reopen()
        gets = []
        t_start = time.perf_counter()
        source = CachedSource(
            list(range(batches)),
            prefetch=lambda ids: s.prefetch([(0, b) for b in ids]),
            depth=prefetch_depth,
        )
        for _ in range(batches):
            bid = source.next()
            t0 = time.perf_counter()
            s.get(0, bid, release=True)
            gets.append(time.perf_counter() - t0)
            time.sleep(step)  # the batch is in use (device compute)
        total = time.perf_counter() - t_start
        st = s.stats()
        s.close(keep_files=True)
        return {
            "total": total,
            "waiting": sum(gets) / total,
            "after first": sum(gets[1:]) / total,
            "from memory": st["hits"],
            "late": st["prefetch_late"],
            "read ms/batch": st["read_seconds"] / max(1, st["loads"]) * 1e3,
        }

    base = run(0)
    results = sorted((run(depth) for _ in range(runs)), key=lambda r: r["waiting"])
    mid = results[len(results) // 2]
    ms = lambda v: Timing(v * 1e3, v * 1e3, v * 1e3, 1)  # noqa: E731
    extra = {
        "step ms": step * 1e3,
        "cold read ms": cold * 1e3,
        "prefetch depth": depth,
        "waiting": mid["waiting"],
        # (waiting, the disk's mean read ms per batch during that loop) for each loop
        "each run": [(round(r["waiting"], 3), round(r["read ms/batch"], 1)) for r in results],
        "waiting after the first get": mid["after first"],
        "waiting w/o prefetch": base["waiting"],
        "gets from memory": f"{mid['from memory']}/{batches}",
        "gets that waited on a read ahead": mid["late"],
        "disk read ms/batch in the loop": mid["read ms/batch"],
        "disk read ms/batch w/o prefetch": base["read ms/batch"],
    }
    row = Row(
        {"case": f"trainer loop x{batches}", "precision": "as_is"},
        ms(mid["total"]),
        ms(base["total"]),
        "same loop without prefetch",
        extra,
    )
    shutil.rmtree(spill, ignore_errors=True)
    return [row]


def bench_cuda(x: torch.Tensor, repeat: int) -> list[Row]:
    nbytes = x.numel() * x.element_size()
    dev = x.cuda()
    pinned = torch.empty_like(x).pin_memory()
    store = ActivationCacheStore(pinned_bytes=4 * nbytes)
    rows = []
    ours, base = compare(
        lambda: store.put(0, 0, dev),
        lambda: (pinned.copy_(dev, non_blocking=True), torch.cuda.synchronize()),
        device="cuda",
        repeat=repeat,
    )
    case = {"case": "put device->pinned", "precision": "as_is"}
    rows.append(Row(case, ours, base, "pinned.copy_(device)", _rate_extra(nbytes, ours, base)))
    ours, base = compare(
        lambda: store.get(0, 0, "cuda"),
        lambda: dev.copy_(pinned, non_blocking=True),
        device="cuda",
        repeat=repeat,
    )
    case = {"case": "get pinned->device", "precision": "as_is"}
    rows.append(Row(case, ours, base, "device.copy_(pinned)", _rate_extra(nbytes, ours, base)))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dir", default=None, help="spill directory parent (default: a temp dir)")
    p.add_argument("--mb", type=int, default=64, help="activation batch size in MiB")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--batches", type=int, default=16, help="batches in the trainer loop")
    p.add_argument("--prefetch-depth", type=int, default=2)
    p.add_argument("--loop-runs", type=int, default=5, help="trainer loops with prefetch (median)")
    p.add_argument("--json", default="bench/results/cache_store.json")
    args = p.parse_args(argv)

    x = torch.randn(args.mb * MiB // 4 // 1024, 1024)  # float32 [tokens, d_model]
    root = Path(tempfile.mkdtemp(prefix="swcache-bench-", dir=args.dir))
    try:
        rows = bench_memory(x, args.repeat)
        rows += bench_spill(x, root, args.repeat)
        rows += bench_trainer_loop(x, root, args.batches, args.prefetch_depth, args.loop_runs)
        if torch.cuda.is_available():
            rows += bench_cuda(x, args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        format_table(
            f"Activation cache store, {args.mb} MiB float32 batches, spill dir {root.parent}",
            rows,
            ["case", "precision", "error stats"],
        )
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = write_json(args.json, "cache_store", environment(device), rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
