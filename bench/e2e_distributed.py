"""Data-parallel benchmark: tokens/s of progressive training on 1 process against 2 processes
(torch.distributed, gloo on CPU / nccl on GPUs) at the same global batch, and what the
collectives cost.

Each case is its own ``torchrun --standalone --nproc_per_node=W`` job training the same rack
(2 stacks of 2 blocks) on the same global batches (the counting task of the tests), so every
case does the same work. Per stage it reports the median step time (the first 3 steps of a
stage are left out) and the global tokens/s. Cases:

- ``1p-1t``: one process, one thread (the baseline of the ``vs 1p`` ratios); ``1p``: one
  process with a thread per core;
- ``2p-ddp`` / ``2p-fsdp``: two processes (one thread each) with DDP / FSDP2;
- ``2p-ddp-nosync``: two processes, DDP with the gradient all-reduce switched off (every
  micro-batch under ``no_sync``; the per-step loss/token all-reduces stay): its step time
  against ``2p-ddp`` is the cost of the gradient collective inside a step.

Each 2-process job also times ``all_reduce`` of one flat fp32 tensor of the size of each stage's
trainable parameters (the gradient volume DDP reduces per step) and of one scalar.

    python bench/e2e_distributed.py [--sizes tiny small] [--steps 20]
                                    [--json bench/results/e2e_distributed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZES = {
    "tiny": {"d_model": 32, "d_ff": 64, "seq": 16, "batch": 8},
    "small": {"d_model": 128, "d_ff": 512, "seq": 64, "batch": 16},
}
CASES = {  # name: (processes, strategy, threads per process; None = all cores)
    "1p-1t": (1, "ddp", 1),
    "1p": (1, "ddp", None),
    "2p-ddp": (2, "ddp", 1),
    "2p-fsdp": (2, "fsdp", 1),
    "2p-ddp-nosync": (2, "ddp-nosync", 1),
}


def _config(size: str, steps: int, strategy: str):
    from stackwise.config.base import StackWiseConfig

    s = SIZES[size]
    return StackWiseConfig.from_dict(
        {
            "model": {
                "vocab_size": 24,
                "d_model": s["d_model"],
                "n_heads": 4,
                "n_kv_heads": 4,
                "d_ff": s["d_ff"],
                "n_layers": 4,
                "max_seq_len": s["seq"],
                "use_rope": True,
                "architecture": {"n_stacks": 2, "blocks_per_stack": 2},
            },
            "training": {
                "device": "cpu",
                "learning_rate": 1e-3,
                "batch_size": s["batch"],
                "seq_len": s["seq"],
                "max_steps": 0,
                "qlora_enabled": False,
                "time_step_masking": False,
                "progressive": {"target_stacks": 2, "steps_per_stack": steps},
                "checkpointing": {"enabled": False},
                "distributed": {"strategy": strategy, "timeout_s": 120},
            },
        }
    ).validate()


def _data(size: str, n_batches: int = 8):
    import torch

    s = SIZES[size]
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_batches):
        start = torch.randint(0, 23, (s["batch"], 1), generator=g)
        out.append((start + torch.arange(s["seq"])) % 23)
    return out


def _time_all_reduce(numel: int, repeat: int = 30) -> float:
    import torch
    import torch.distributed as dist

    t = torch.zeros(max(1, numel))
    for _ in range(3):
        dist.all_reduce(t)
    times = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def worker(args) -> None:
    """One rank of a case (under torchrun)."""
    import torch

    from stackwise.run.launch import train_distributed
    from stackwise.training.parallel import DataParallel

    nosync = args.strategy == "ddp-nosync"
    if nosync:  # every micro-batch skips the gradient all-reduce (timing only)
        original = DataParallel.no_sync
        DataParallel.no_sync = lambda self, skip: original(self, True)
    config = _config(args.size, args.steps, "ddp" if nosync else args.strategy)
    torch.manual_seed(0)
    res = train_distributed(config, lambda ctx: _data(args.size))
    ctx = res["context"]
    stages = []
    for h in res["history"]:
        step_ms = h["step_ms"][3:] or h["step_ms"]
        med = statistics.median(step_ms)
        tokens_per_step = h["tokens"] / h["steps"]
        stages.append(
            {
                "stage": h["stage"],
                "step_ms": med,
                "tokens_per_s": 1e3 * tokens_per_step / med,
                "final_loss": h["losses"][-1],
            }
        )
    out = {"stages": stages, "world_size": ctx.world_size, "threads": torch.get_num_threads()}
    if ctx.enabled:
        rack = res["rack"]
        per_stage = [sum(p.numel() for p in s.parameters()) for s in rack.stacks]
        head = sum(p.numel() for p in rack.final_norm.parameters())
        emb = sum(p.numel() for p in rack.lexical.parameters())  # tied: also the head
        grads = [per_stage[0] + head + emb, per_stage[1] + head]
        out["grad_numel"] = grads
        out["all_reduce_ms"] = [_time_all_reduce(n) for n in grads]
        out["scalar_all_reduce_ms"] = _time_all_reduce(1)
    if ctx.is_main:
        Path(args.out).write_text(json.dumps(out))
    ctx.barrier()
    ctx.shutdown()


def _run_case(size: str, case: str, steps: int) -> dict:
    nproc, strategy, threads = CASES[case]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = str(threads or len(os.sched_getaffinity(0)))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    torchrun = Path(sys.executable).with_name("torchrun")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [str(torchrun), "--standalone", f"--nproc_per_node={nproc}", __file__, "--worker"]
        cmd += ["--size", size, "--steps", str(steps), "--strategy", strategy, "--out", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{size}/{case} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--size", default="tiny")
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    p.add_argument("--cases", nargs="+", default=list(CASES))
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out")
    p.add_argument("--json", default=str(HERE / "results" / "e2e_distributed.json"))
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT / "python"))
    from harness import environment
    from stackwise._io import atomic_write_text

    rows = []
    header = f"{'size':6} {'case':14} {'stage':5} {'step ms':>9} {'tokens/s':>10} {'vs 1p-1t':>8}"
    print(header)
    for size in args.sizes:
        base = None
        for case in args.cases:
            res = _run_case(size, case, args.steps)
            for st in res["stages"]:
                if case == "1p-1t":
                    base = base or {}
                    base[st["stage"]] = st["tokens_per_s"]
                ratio = st["tokens_per_s"] / base[st["stage"]] if base else float("nan")
                row = {"size": size, "case": case, **st, "vs_1p_1t": ratio}
                if "all_reduce_ms" in res:
                    row["grad_numel"] = res["grad_numel"][st["stage"]]
                    row["grad_all_reduce_ms"] = res["all_reduce_ms"][st["stage"]]
                    row["scalar_all_reduce_ms"] = res["scalar_all_reduce_ms"]
                rows.append(row)
                print(
                    f"{size:6} {case:14} {st['stage']:5} {st['step_ms']:9.2f} "
                    f"{st['tokens_per_s']:10.0f} {ratio:8.2f}"
                    + (
                        f"  all_reduce({row['grad_numel']} fp32) {row['grad_all_reduce_ms']:.3f} "
                        f"ms, scalar {row['scalar_all_reduce_ms']:.3f} ms"
                        if "grad_all_reduce_ms" in row
                        else ""
                    )
                )
    payload = {
        "benchmark": "e2e_distributed",
        "environment": {**environment("cpu"), "cpu_count": os.cpu_count()},
        "steps_per_stack": args.steps,
        "sizes": {k: SIZES[k] for k in args.sizes},
        "rows": rows,
    }
    atomic_write_text(args.json, json.dumps(payload, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
