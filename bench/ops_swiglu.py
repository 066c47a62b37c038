"""SwiGLU benchmark: stackwise.ops.swiglu against eager ``F.silu(gate) * up``.

Forward and forward+backward, at 8192x4096 by default, fp32 and bf16, on CPU and (when present)
CUDA. On CUDA it also measures a device-to-device copy of the same tensor in the same run and
reports the forward's bandwidth as a fraction of it.

    python bench/ops_swiglu.py [--device cpu|cuda|all] [--shape 8192 4096] [--repeat 10]
                               [--json bench/results/ops_swiglu.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stackwise  # noqa: E402
from harness import Row, compare, environment, format_table, time_fn, write_json  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_case(device: str, shape: list[int], dname: str, repeat: int) -> list[Row]:
    """Forward and forward+backward rows for one dtype on one device."""
    dtype = DTYPES[dname]
    g = torch.randn(shape, device=device, dtype=dtype)
    u = torch.randn(shape, device=device, dtype=dtype)
    dy = torch.randn(shape, device=device, dtype=dtype)
    numel, esize = g.numel(), g.element_size()
    case = {"device": device, "dtype": dname, "shape": "x".join(map(str, shape))}
    baseline = "eager F.silu(gate) * up"

    ours, eager = compare(
        lambda: stackwise.ops.swiglu(g, u), lambda: F.silu(g) * u, device, repeat=repeat
    )
    # Forward traffic: read gate and up, write out.
    extra: dict = {"GB/s": 3 * numel * esize / (ours.median_ms * 1e-3) / 1e9}
    if device.startswith("cuda"):
        dst = torch.empty_like(g)
        copy = time_fn(lambda: dst.copy_(g), device, repeat=repeat)
        copy_bw = 2 * numel * esize / (copy.median_ms * 1e-3) / 1e9
        extra["copy GB/s"] = copy_bw
        extra["of copy bw"] = extra["GB/s"] / copy_bw
    rows = [Row({**case, "pass": "fwd"}, ours, eager, baseline, extra)]

    gr = g.clone().requires_grad_(True)
    ur = u.clone().requires_grad_(True)

    def step(fn):
        def run():
            gr.grad = None
            ur.grad = None
            fn(gr, ur).backward(dy)

        return run

    ours, eager = compare(
        step(stackwise.ops.swiglu), step(lambda a, b: F.silu(a) * b), device, repeat=repeat
    )
    rows.append(Row({**case, "pass": "fwd+bwd"}, ours, eager, baseline, {}))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    p.add_argument("--shape", type=int, nargs="+", default=[8192, 4096])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", default="bench/results/ops_swiglu.json")
    args = p.parse_args(argv)

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            p.error("--device cuda: no CUDA device is visible")
        devices.remove("cuda")
    rows: list[Row] = []
    for device in devices:
        for dname in args.dtypes:
            rows += bench_case(device, args.shape, dname, args.repeat)
    print(
        format_table(
            "SwiGLU (median of runs, interleaved with the baseline)",
            rows,
            ["device", "dtype", "pass", "shape"],
        )
    )
    out = write_json(args.json, "ops_swiglu", environment(devices[-1]), rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
