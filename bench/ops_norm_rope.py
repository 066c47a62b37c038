"""RMSNorm and RoPE benchmark: stackwise.ops.rms_norm / rope against eager PyTorch.

Baselines are the formulations of a typical LLaMA implementation:
  rms_norm: h = x.float(); h = h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps);
            w * h.to(x.dtype)                                   (fp32 statistics)
  rope:     q * cos + rotate_half(q) * sin (and the same for k), cos/sin [S, D] in q's dtype,
            rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
Forward and forward+backward (grads of x and weight; of q and k), fp32 and bf16, at training
shapes: rms_norm x [8*1024, 4096]; rope q [8, 32, 1024, 128], k [8, 8, 1024, 128] (GQA).
CPU only until the CUDA kernels land.

    python bench/ops_norm_rope.py [--ops rms_norm rope] [--dtypes fp32 bf16] [--repeat 10]
                                  [--norm-shape 8192 4096] [--rope-shape 8 32 8 1024 128]
                                  [--json bench/results/ops_norm_rope.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stackwise  # noqa: E402
from harness import Row, compare, environment, format_table, write_json  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EPS = 1e-6


def eager_rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_rope(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _fwd_bwd(fn, inputs, grads):
    def run():
        for t in inputs:
            t.grad = None
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, grads)

    return run


def bench_rms_norm(shape: list[int], dname: str, repeat: int) -> list[Row]:
    dtype = DTYPES[dname]
    x = torch.randn(shape, dtype=dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    dy = torch.randn(shape, dtype=dtype)
    case = {"op": "rms_norm", "dtype": dname, "shape": "x".join(map(str, shape))}
    baseline = "eager LLaMA RMSNorm (fp32 statistics)"
    nbytes = x.numel() * x.element_size()

    ours, eager = compare(
        lambda: stackwise.ops.rms_norm(x, w, EPS), lambda: eager_rms_norm(x, w), repeat=repeat
    )
    # Forward traffic: read x, write y.
    rows = [
        Row(
            {**case, "pass": "fwd"},
            ours,
            eager,
            baseline,
            {"GB/s": 2 * nbytes / (ours.median_ms * 1e-3) / 1e9},
        ),
    ]
    xr = x.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    ours, eager = compare(
        _fwd_bwd(lambda a, b: stackwise.ops.rms_norm(a, b, EPS), (xr, wr), (dy,)),
        _fwd_bwd(eager_rms_norm, (xr, wr), (dy,)),
        repeat=repeat,
    )
    rows.append(Row({**case, "pass": "fwd+bwd"}, ours, eager, baseline, {}))
    return rows


def bench_rope(shape: list[int], dname: str, repeat: int) -> list[Row]:
    b, hq, hk, s, d = shape
    dtype = DTYPES[dname]
    q = torch.randn(b, hq, s, d, dtype=dtype)
    k = torch.randn(b, hk, s, d, dtype=dtype)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    cos, sin = stackwise.ops.rope_tables(s, d)
    # The eager module's tables: [S, D] (frequencies repeated), in q's dtype, prepared once.
    cos_full = torch.cat([cos, cos], -1).to(dtype)
    sin_full = torch.cat([sin, sin], -1).to(dtype)
    case = {
        "op": "rope",
        "dtype": dname,
        "shape": f"q{b}x{hq}x{s}x{d} k{b}x{hk}x{s}x{d}",
    }
    baseline = "eager rotate_half RoPE"
    nbytes = (q.numel() + k.numel()) * q.element_size()

    def ours_fn(a, c):
        return stackwise.ops.rope(a, c, cos, sin)

    def eager_fn(a, c):
        return eager_rope(a, c, cos_full, sin_full)

    ours, eager = compare(lambda: ours_fn(q, k), lambda: eager_fn(q, k), repeat=repeat)
    rows = [
        Row(
            {**case, "pass": "fwd"},
            ours,
            eager,
            baseline,
            {"GB/s": 2 * nbytes / (ours.median_ms * 1e-3) / 1e9},
        ),
    ]
    qr = q.clone().requires_grad_(True)
    kr = k.clone().requires_grad_(True)
    ours, eager = compare(
        _fwd_bwd(ours_fn, (qr, kr), (gq, gk)),
        _fwd_bwd(eager_fn, (qr, kr), (gq, gk)),
        repeat=repeat,
    )
    rows.append(Row({**case, "pass": "fwd+bwd"}, ours, eager, baseline, {}))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ops", nargs="+", default=["rms_norm", "rope"], choices=["rms_norm", "rope"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--norm-shape", type=int, nargs="+", default=[8 * 1024, 4096])
    p.add_argument(
        "--rope-shape",
        type=int,
        nargs=5,
        default=[8, 32, 8, 1024, 128],
        metavar=("B", "HQ", "HK", "S", "D"),
    )
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", default="bench/results/ops_norm_rope.json")
    args = p.parse_args(argv)

    rows: list[Row] = []
    for dname in args.dtypes:
        if "rms_norm" in args.ops:
            rows += bench_rms_norm(args.norm_shape, dname, args.repeat)
        if "rope" in args.ops:
            rows += bench_rope(args.rope_shape, dname, args.repeat)
    titles = {"rms_norm": "RMSNorm", "rope": "RoPE"}
    for op in args.ops:
        print(
            format_table(
                f"{titles[op]} on CPU (median of runs, interleaved with the baseline)",
                [r for r in rows if r.case["op"] == op],
                ["op", "dtype", "pass", "shape"],
            )
        )
    out = write_json(args.json, "ops_norm_rope", environment("cpu"), rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
