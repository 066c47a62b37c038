"""Quantization benchmarks.

1. NF4 quantize / dequantize of a 4096x4096 fp32 weight on CPU: stackwise vs bitsandbytes' CPU
   path and vs a straightforward torch implementation (stackwise.ops.reference), in elements/s.
2. Memory: a GPT-2-small-shaped stack (12 blocks of qkv/proj/fc/out linears) in NF4 vs fp16.
3. quantized_linear (NF4 weight) vs F.linear with the fp32 / bf16 weight, M in {16, 1024},
   K = N = 4096.

    python bench/ops_quant.py [--repeat 10] [--json bench/results/ops_quant.json]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stackwise  # noqa: E402
from harness import Row, compare, environment, format_table, write_json  # noqa: E402
from stackwise.ops import reference as ref  # noqa: E402
from stackwise.training.strategies.quantization import QuantizationManager  # noqa: E402


def _bnb():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.functional as bnb_f
        return bnb_f
    except ImportError:
        return None


def nf4_rows(repeat: int) -> list[Row]:
    w = torch.randn(4096, 4096)
    n = w.numel()
    packed, absmax = stackwise.ops.quantize_nf4(w, 64)
    rows: list[Row] = []
    baselines = [
        (
            "torch reference",
            lambda: ref.quantize_nf4_reference(w, 64),
            lambda: ref.dequantize_nf4_reference(packed, absmax, w.shape, 64),
        )
    ]
    bnb_f = _bnb()
    if bnb_f is not None:
        q, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
        baselines.append(
            (
                "bitsandbytes",
                lambda: bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4"),
                lambda: bnb_f.dequantize_4bit(q, state),
            )
        )
    for name, base_q, base_dq in baselines:
        ours, theirs = compare(lambda: stackwise.ops.quantize_nf4(w, 64), base_q, repeat=repeat)
        rows.append(
            Row(
                {"op": "quantize_nf4", "shape": "4096x4096"},
                ours,
                theirs,
                name,
                {"Gelem/s": n / ours.median_ms / 1e6, "base Gelem/s": n / theirs.median_ms / 1e6},
            )
        )
        ours, theirs = compare(
            lambda: stackwise.ops.dequantize_nf4(packed, absmax, w.shape, 64),
            base_dq,
            repeat=repeat,
        )
        rows.append(
            Row(
                {"op": "dequantize_nf4", "shape": "4096x4096"},
                ours,
                theirs,
                name,
                {"Gelem/s": n / ours.median_ms / 1e6, "base Gelem/s": n / theirs.median_ms / 1e6},
            )
        )
    return rows


def memory_ratio(double_quant: bool = False) -> float:
    blocks = nn.ModuleList(
        nn.ModuleDict(
            {
                "qkv": nn.Linear(768, 2304),
                "proj": nn.Linear(768, 768),
                "fc": nn.Linear(768, 3072),
                "out": nn.Linear(3072, 768),
            }
        )
        for _ in range(12)
    )
    fp16_bytes = sum(p.numel() * 2 for p in blocks.parameters())
    mgr = QuantizationManager(keep_backup=False, double_quant=double_quant)
    mgr.convert_to_precision(blocks, "nf4")
    return mgr.memory_footprint(blocks) / fp16_bytes


def linear_rows(repeat: int) -> list[Row]:
    rows: list[Row] = []
    w = torch.randn(4096, 4096) * 0.02
    packed, absmax = stackwise.ops.quantize_nf4(w, 64)
    for m in (16, 1024):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, 4096, dtype=dtype)
            wd = w.to(dtype)
            ours, theirs = compare(
                lambda x=x: stackwise.ops.quantized_linear(x, packed, absmax, "nf4", 4096, 4096),
                lambda x=x, wd=wd: F.linear(x, wd),
                repeat=repeat,
            )
            dname = "fp32" if dtype == torch.float32 else "bf16"
            rows.append(
                Row(
                    {"op": "quantized_linear nf4", "shape": f"M={m} K=N=4096", "dtype": dname},
                    ours,
                    theirs,
                    f"F.linear with the {dname} weight",
                    {},
                )
            )
    return rows


def cuda_rows(repeat: int) -> list[Row]:
    """NF4 dequantize bandwidth on the GPU against a device-to-device copy in the same run
    (bytes read + written for both)."""
    from harness import time_fn

    w = torch.randn(8192, 8192, device="cuda")
    packed, absmax = stackwise.ops.quantize_nf4(w, 64)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        out = stackwise.ops.dequantize_nf4(packed, absmax, w.shape, 64, dtype)
        dst = torch.empty_like(out)
        ours = time_fn(
            lambda dtype=dtype: stackwise.ops.dequantize_nf4(packed, absmax, w.shape, 64, dtype),
            "cuda",
            repeat=repeat,
        )
        copy = time_fn(lambda out=out, dst=dst: dst.copy_(out), "cuda", repeat=repeat)
        moved = packed.numel() + absmax.numel() * 4 + out.numel() * out.element_size()
        bw = moved / (ours.median_ms * 1e-3) / 1e9
        copy_bw = 2 * out.numel() * out.element_size() / (copy.median_ms * 1e-3) / 1e9
        rows.append(
            Row(
                {
                    "op": "dequantize_nf4",
                    "shape": "8192x8192",
                    "dtype": str(dtype).replace("torch.", ""),
                },
                ours,
                copy,
                "device-to-device copy of the output",
                {"GB/s": bw, "copy GB/s": copy_bw, "of copy bw": bw / copy_bw},
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", default="bench/results/ops_quant.json")
    args = p.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible")
        rows = cuda_rows(args.repeat)
        print(format_table("NF4 dequantize on CUDA", rows, ["op", "shape", "dtype"]))
        out = write_json(args.json, "ops_quant_cuda", environment("cuda"), rows)
        print(f"wrote {out}")
        return 0
    rows = nf4_rows(args.repeat)
    for r in rows:
        print(format_table(f"vs {r.baseline_name}", [r], ["op", "shape"]))
    lin = linear_rows(args.repeat)
    print(format_table("quantized_linear", lin, ["op", "shape", "dtype"]))
    ratio = memory_ratio()
    ratio_dq = memory_ratio(double_quant=True)
    print(
        f"GPT-2-small-shaped stack (12 blocks of linears): NF4 bytes / fp16 bytes = {ratio:.4f}"
        f" ({ratio_dq:.4f} with double quantization)"
    )
    env = environment("cpu")
    env["nf4_over_fp16_bytes"] = ratio
    env["nf4_dq_over_fp16_bytes"] = ratio_dq
    out = write_json(args.json, "ops_quant", env, rows + lin)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
