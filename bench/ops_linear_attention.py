"""Linear attention benchmark: stackwise.ops.linear_attention against softmax attention.

Forward and forward+backward over feature maps phi(q), phi(k) [B, H, S, M] and values
[B, H, S, Dv] (H = 8, M = Dv = 64 by default), causal and not, against softmax attention of the
same q/k/v shape: ``stackwise.ops.attention`` where the build has it, else
``torch.nn.functional.scaled_dot_product_attention``. Linear attention is O(S) and softmax
attention O(S^2), so the table ends with the crossover: the shortest S from which linear attention
is faster at every longer S measured.

    python bench/ops_linear_attention.py [--device cpu|cuda|all] [--batch 1 4]
        [--seq 128 256 512 1024 2048 4096] [--dtypes fp32 bf16] [--repeat 5] [--threads N]
        [--json bench/results/ops_linear_attention.json]

On a small shared CPU, ``--threads 1`` gives steadier figures: with every core busy elsewhere, an
OpenMP region waits milliseconds for its threads to be scheduled, which swamps short sequences.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stackwise  # noqa: E402
from harness import Row, compare, environment, format_table, write_json  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def softmax_attention() -> tuple[str, Callable]:
    """The softmax baseline: the project's own op when it exists, else PyTorch's SDPA."""
    if hasattr(stackwise.ops, "attention"):
        return "stackwise.ops.attention", lambda q, k, v, causal: stackwise.ops.attention(
            q, k, v, causal=causal
        )
    return "F.scaled_dot_product_attention", lambda q, k, v, causal: F.scaled_dot_product_attention(
        q, k, v, is_causal=causal
    )


def bench_case(
    device: str, batch: int, heads: int, seq: int, dim: int, dname: str, causal: bool, repeat: int
) -> list[Row]:
    dtype = DTYPES[dname]
    gen = torch.Generator().manual_seed(0)
    shape = (batch, heads, seq, dim)
    # Positive features, as a feature map gives; the softmax baseline reads the same tensors.
    q, k = (torch.rand(shape, generator=gen).to(dtype).to(device) for _ in range(2))
    v, dy = (torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(2))
    base_name, base_fn = softmax_attention()
    case = {
        "device": device,
        "dtype": dname,
        "B": batch,
        "H": heads,
        "S": seq,
        "M=Dv": dim,
        "causal": causal,
    }

    def ours_fn(a, b, c):
        return stackwise.ops.linear_attention(a, b, c, causal=causal)

    def base(a, b, c):
        return base_fn(a, b, c, causal)

    ours, other = compare(lambda: ours_fn(q, k, v), lambda: base(q, k, v), device, 1, repeat)
    rows = [Row({**case, "pass": "fwd"}, ours, other, base_name, {})]

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]

    def step(fn):
        def run():
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(dy)

        return run

    ours, other = compare(step(ours_fn), step(base), device, 1, repeat)
    rows.append(Row({**case, "pass": "fwd+bwd"}, ours, other, base_name, {}))
    return rows


def crossovers(rows: list[Row]) -> list[str]:
    """Per (device, dtype, B, causal, pass): the shortest S from which linear attention wins."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        key = tuple(r.case[c] for c in ("device", "dtype", "B", "causal", "pass"))
        groups.setdefault(key, []).append(r)
    lines = []
    for key, rs in groups.items():
        rs.sort(key=lambda r: r.case["S"])
        cross = None
        for i, r in enumerate(rs):
            if all(x.speedup > 1.0 for x in rs[i:]):
                cross = r.case["S"]
                break
        label = "device={} dtype={} B={} causal={} pass={}".format(*key)
        if cross is None:
            lines.append(f"{label}: softmax attention faster at every S measured")
        elif cross == rs[0].case["S"]:
            lines.append(f"{label}: linear faster from the shortest S measured ({cross})")
        else:
            lines.append(f"{label}: linear faster from S = {cross}")
        for r in rs:
            r.extra["crossover S"] = cross if cross is not None else "none"
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
    p.add_argument("--dim", type=int, default=64, help="M = Dv = head dim of the baseline")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--causal", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--json", default="bench/results/ops_linear_attention.json")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            p.error("--device cuda: no CUDA device is visible")
        devices.remove("cuda")
    if "cuda" in devices and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "stackwise::linear_attention", "CUDA"
    ):
        print("skipping cuda: this build has no CUDA kernel for stackwise::linear_attention")
        devices.remove("cuda")
    if not devices:
        return 0
    rows: list[Row] = []
    for device in devices:
        for dname in args.dtypes:
            for causal in (c == "yes" for c in args.causal):
                for batch in args.batch:
                    for seq in args.seq:
                        rows += bench_case(
                            device, batch, args.heads, seq, args.dim, dname, causal, args.repeat
                        )
    summary = crossovers(rows)
    print(
        format_table(
            "Linear vs softmax attention (median of runs, interleaved with the baseline)",
            rows,
            ["device", "dtype", "causal", "B", "H", "S", "M=Dv", "pass"],
        )
    )
    print("\n".join(["crossover:", *summary]))
    out = write_json(args.json, "ops_linear_attention", environment(devices[-1]), rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
