"""Linear cross-entropy benchmark: stackwise.ops.linear_cross_entropy against
``F.cross_entropy(F.linear(h, w).float(), y)`` (what the trainers ran before), forward+backward.

Each case reports the time (median, interleaved with the baseline in the same process) and the
peak extra memory of one forward+backward: the largest amount of memory the step allocated
beyond its inputs at any moment, gradients included. On CPU it is read from the allocator
events torch.profiler records (profile_memory=True); on CUDA from torch.cuda.max_memory_allocated.
Default cases: V in {259, 50259, 128256}, N in {2048, 8192}, d 128 (the shipped config's width),
fp32 and bf16, 10% of labels ignored. Cases whose baseline logits exceed --max-logits-gb are
skipped unless --all (N=8192 x V=128256 needs ~13 GB for the baseline in fp32).

    python bench/ops_linear_cross_entropy.py [--device cpu|cuda] [--d 128] [--repeat 3] [--all]
                                             [--json bench/results/ops_linear_cross_entropy.json]
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

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VOCABS = [259, 50259, 128256]
TOKENS = [2048, 8192]


def peak_extra_bytes(fn, device: str) -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated when it started."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The allocator's own events (every allocation and free, in order), not the per-op sums.
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    now = peak = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def bench_case(device: str, n: int, v: int, d: int, dname: str, repeat: int) -> Row:
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(v, d, generator=g) * d**-0.5).to(device=device, dtype=dtype)
    w.requires_grad_(True)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = -100
    y = y.to(device)

    def step(loss_fn):
        def run():
            h.grad = None
            w.grad = None
            loss_fn().backward()

        return run

    ours = step(lambda: stackwise.ops.linear_cross_entropy(h, w, y))
    ref = step(lambda: F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100))
    t_ours, t_ref = compare(ours, ref, device, warmup=1, repeat=repeat)
    m_ours = peak_extra_bytes(ours, device)
    m_ref = peak_extra_bytes(ref, device)
    case = {"device": device, "dtype": dname, "N": n, "V": v, "d": d}
    extra = {
        "peak MB": m_ours / 2**20,
        "baseline peak MB": m_ref / 2**20,
        "memory ratio": m_ours / m_ref,
    }
    return Row(case, t_ours, t_ref, "F.cross_entropy(F.linear(h, w).float(), y)", extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--vocabs", type=int, nargs="+", default=VOCABS)
    p.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-logits-gb", type=float, default=2.0)
    p.add_argument("--all", action="store_true", help="also the cases over --max-logits-gb")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    rows: list[Row] = []
    skipped = []
    for dname in args.dtypes:
        for v in args.vocabs:
            for n in args.tokens:
                if not args.all and n * v * 4 / 2**30 > args.max_logits_gb:
                    skipped.append(f"{dname} N={n} V={v}")
                    continue
                rows.append(bench_case(args.device, n, v, args.d, dname, args.repeat))
                print(format_table("", rows[-1:], ["dtype", "N", "V"]).splitlines()[-2], flush=True)
    print(
        format_table(
            f"Linear cross-entropy forward+backward on {args.device} (median of runs, "
            "interleaved with the baseline)",
            rows,
            ["device", "dtype", "N", "V", "d"],
        )
    )
    if skipped:
        print(f"skipped (baseline logits > {args.max_logits_gb} GB; --all runs them): {skipped}")
    name = "ops_linear_cross_entropy" + ("_cuda" if args.device == "cuda" else "")
    path = args.json or f"bench/results/{'gpu/' if args.device == 'cuda' else ''}{name}.json"
    out = write_json(path, name, environment(args.device), rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
