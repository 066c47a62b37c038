"""Shared timing helper for the benchmarks in bench/.

Speed is reported as a ratio against a baseline measured in the same process, with candidate and
baseline runs interleaved, because these machines are shared and noisy: a load that slows one
slows both. Each figure is the median of `repeat` timed runs after `warmup` untimed ones, with the
10th-90th percentile spread. On CUDA, runs are timed with CUDA events on the current stream.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


@dataclass
class Row:
    """One line of a benchmark table: a case, our time, the baseline's, and derived figures."""

    case: dict[str, Any]
    stackwise: Timing
    baseline: Timing
    baseline_name: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.baseline.median_ms / self.stackwise.median_ms


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _summary(samples: list[float]) -> Timing:
    return Timing(
        median_ms=statistics.median(samples),
        p10_ms=_quantile(samples, 0.1),
        p90_ms=_quantile(samples, 0.9),
        runs=len(samples),
    )


def _timed_once(fn: Callable[[], Any], device: str) -> float:
    if device.startswith("cuda"):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_fn(
    fn: Callable[[], Any], device: str = "cpu", warmup: int = 3, repeat: int = 10
) -> Timing:
    """Median and spread of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return _summary([_timed_once(fn, device) for _ in range(repeat)])


def compare(
    candidate: Callable[[], Any],
    baseline: Callable[[], Any],
    device: str = "cpu",
    warmup: int = 3,
    repeat: int = 10,
) -> tuple[Timing, Timing]:
    """Time candidate and baseline alternately (ABAB...) so drifting load hits both equally."""
    for _ in range(warmup):
        candidate()
        baseline()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    a: list[float] = []
    b: list[float] = []
    for i in range(repeat):
        # Alternate which goes first, so neither always runs on a warmer cache.
        if i % 2 == 0:
            a.append(_timed_once(candidate, device))
            b.append(_timed_once(baseline, device))
        else:
            b.append(_timed_once(baseline, device))
            a.append(_timed_once(candidate, device))
    return _summary(a), _summary(b)


def environment(device: str) -> dict[str, Any]:
    """What the figures were measured on."""
    import stackwise

    env: dict[str, Any] = {
        "stackwise": stackwise.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_isa": stackwise._C.cpu_isa(),
        "device": device,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_capability=f"{p.major}.{p.minor}", torch_cuda=torch.version.cuda)
        clocks = _gpu_clocks()
        if clocks:
            env["gpu_clocks"] = clocks
    return env


def _gpu_clocks() -> dict[str, str] | None:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    q = "clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem"
    res = subprocess.run(
        ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True
    )
    if res.returncode != 0:
        return None
    vals = [v.strip() for v in res.stdout.splitlines()[0].split(",")]
    return dict(zip(q.split(","), vals, strict=False))


def format_table(title: str, rows: list[Row], columns: list[str]) -> str:
    """A fixed-width table: the case columns, our median, the baseline's, the speed-up, extras."""
    extra_keys: list[str] = []
    for r in rows:
        for k in r.extra:
            if k not in extra_keys:
                extra_keys.append(k)
    header = [*columns, "stackwise ms", "baseline ms", "speedup", *extra_keys]
    body = []
    for r in rows:
        cells = [str(r.case.get(c, "")) for c in columns]
        cells += [
            f"{r.stackwise.median_ms:.3f}",
            f"{r.baseline.median_ms:.3f}",
            f"{r.speedup:.2f}x",
        ]
        cells += [_fmt(r.extra.get(k, "")) for k in extra_keys]
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    if rows:
        lines.append(f"baseline: {rows[0].baseline_name}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_json(
    path: str | os.PathLike[str], name: str, env: dict[str, Any], rows: list[Row]
) -> Path:
    """Write the figures atomically (temporary file, fsync, rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "environment": env,
        "rows": [
            {
                "case": r.case,
                "stackwise": asdict(r.stackwise),
                "baseline": asdict(r.baseline),
                "baseline_name": r.baseline_name,
                "speedup": r.speedup,
                **r.extra,
            }
            for r in rows
        ],
    }
    from stackwise._io import atomic_write_text

    return atomic_write_text(out, json.dumps(payload, indent=2))
