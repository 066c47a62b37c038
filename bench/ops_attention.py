"""Attention benchmark: stackwise.ops.attention against F.scaled_dot_product_attention on CPU.

Forward and forward+backward for GQA 4:1 (B=1, Hq=8, Hkv=2 by default), fp32 and bf16,
S in {512, 1024, 2048}, D in {64, 128}, causal and not. The baseline is SDPA in the same process,
run two ways, and the faster of the two is the one reported (the other is in the JSON):
``enable_gqa=True`` with the [B, Hkv, S, D] K/V, and K/V repeated to Hq heads with
``repeat_interleave`` before timing (the copy is not charged to it). Throughput uses
FlashAttention's FLOP count: 4*B*Hq*S^2*D forward (half of it when causal), 2.5x that backward.

    python bench/ops_attention.py [--seq 512 1024 2048] [--dims 64 128] [--dtypes fp32 bf16]
                                  [--repeat 5] [--json bench/results/ops_attention.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stackwise  # noqa: E402
from harness import Row, compare, environment, format_table, write_json  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def flops(b: int, h: int, s: int, d: int, causal: bool, backward: bool) -> float:
    fwd = 4.0 * b * h * s * s * d / (2 if causal else 1)
    return fwd * (3.5 if backward else 1.0)


def _faster(
    candidate, baselines: dict[str, object], repeat: int
) -> tuple[object, object, str, dict[str, float]]:
    """Time the candidate against each baseline (interleaved); keep the fastest baseline."""
    best = None
    all_ms: dict[str, float] = {}
    for name, fn in baselines.items():
        ours, base = compare(candidate, fn, "cpu", warmup=2, repeat=repeat)
        all_ms[f"{name} ms"] = base.median_ms
        if best is None or base.median_ms < best[1].median_ms:
            best = (ours, base, name)
    return (*best, all_ms)


def bench_case(
    dname: str, b: int, hq: int, hkv: int, s: int, d: int, causal: bool, repeat: int
) -> list[Row]:
    dtype = DTYPES[dname]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, s, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
    dout = torch.randn(b, hq, s, d, generator=gen).to(dtype)
    group = hq // hkv
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    case = {"dtype": dname, "S": s, "D": d, "causal": causal, "heads": f"{hq}:{hkv}", "B": b}

    fwd_baselines = {
        "sdpa enable_gqa": lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal, enable_gqa=True
        ),
        "sdpa repeat_interleave": lambda: F.scaled_dot_product_attention(
            q, kr, vr, is_causal=causal
        ),
    }
    ours, base, name, extra = _faster(
        lambda: stackwise.ops.attention(q, k, v, causal=causal), fwd_baselines, repeat
    )
    rows = [
        Row(
            {**case, "pass": "fwd"},
            ours,
            base,
            name,
            {
                "GFLOP/s": flops(b, hq, s, d, causal, False) / ours.median_ms / 1e6,
                "base GFLOP/s": flops(b, hq, s, d, causal, False) / base.median_ms / 1e6,
                "vs": name.removeprefix("sdpa "),
                **extra,
            },
        )
    ]

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, kr, vr)]
    ql, kl, vl, krl, vrl = leaves

    def step(fn, args):
        def run():
            for t in args:
                t.grad = None
            fn(*args).backward(dout)

        return run

    train_baselines = {
        "sdpa enable_gqa": step(
            lambda a, b_, c: F.scaled_dot_product_attention(
                a, b_, c, is_causal=causal, enable_gqa=True
            ),
            (ql, kl, vl),
        ),
        "sdpa repeat_interleave": step(
            lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c, is_causal=causal),
            (ql, krl, vrl),
        ),
    }
    ours, base, name, extra = _faster(
        step(lambda a, b_, c: stackwise.ops.attention(a, b_, c, causal=causal), (ql, kl, vl)),
        train_baselines,
        repeat,
    )
    rows.append(
        Row(
            {**case, "pass": "fwd+bwd"},
            ours,
            base,
            name,
            {
                "GFLOP/s": flops(b, hq, s, d, causal, True) / ours.median_ms / 1e6,
                "base GFLOP/s": flops(b, hq, s, d, causal, True) / base.median_ms / 1e6,
                "vs": name.removeprefix("sdpa "),
                **extra,
            },
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--causal", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, nargs=2, default=[8, 2], metavar=("HQ", "HKV"))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", default="bench/results/ops_attention.json")
    args = p.parse_args(argv)

    rows: list[Row] = []
    for dname in args.dtypes:
        for s in args.seq:
            for d in args.dims:
                for c in args.causal:
                    rows += bench_case(
                        dname, args.batch, *args.heads, s, d, c == "yes", args.repeat
                    )
                    print(
                        format_table("", rows[-2:], ["dtype", "S", "D", "causal", "pass"]),
                        flush=True,
                    )
    print(
        format_table(
            "Attention on CPU (median of runs, interleaved with the faster SDPA variant)",
            rows,
            ["dtype", "B", "heads", "S", "D", "causal", "pass"],
        )
    )
    out = write_json(args.json, "ops_attention", environment("cpu"), rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
