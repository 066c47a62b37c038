"""Depth benchmark: progressive training with cached trunk activations against end-to-end
training of the same rack, at depth 2, 4, 8 and 16 blocks.

Same data (the pydoc corpus, byte tokenizer), same width, same steps per stage. Each
configuration runs in its own subprocess, which reports its step times and its peak resident
memory (ru_maxrss); on CUDA the peak of torch.cuda.max_memory_allocated as well. Progressive
stacks are 2 blocks each; stage N's step time excludes the one-off pass that fills the cache
(reported separately).

    python bench/e2e_depth.py [--depths 2 4 8 16] [--steps 20] [--d-model 256]
                              [--json bench/results/e2e_depth.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _config(depth: int, steps: int, d_model: int, mode: str):
    from stackwise.config.base import StackWiseConfig

    return StackWiseConfig.from_dict(
        {
            "model": {
                "vocab_size": 259,
                "d_model": d_model,
                "n_heads": 4,
                "n_kv_heads": 4,
                "d_ff": 4 * d_model,
                "n_layers": depth,
                "max_seq_len": 128,
                "use_rope": True,
                "architecture": {"n_stacks": depth // 2, "blocks_per_stack": 2},
            },
            "training": {
                "batch_size": 8,
                "seq_len": 128,
                "learning_rate": 1e-3,
                "max_steps": 0,
                "qlora_enabled": False,
                "progressive": {"target_stacks": depth // 2, "steps_per_stack": steps},
                "caching": {"max_memory_mb": 8192, "max_cache_size": 100000},
            },
            "data": {"corpus": "pydoc", "tokenizer": "bytes"},
        }
    ).validate()


def worker(mode: str, depth: int, steps: int, d_model: int) -> dict:
    import torch

    from stackwise.data import create_data_loaders
    from stackwise.training import ProgressiveRackBuilder, ProgressiveTrainer

    torch.manual_seed(0)
    cfg = _config(depth, steps, d_model, mode)
    train, val = create_data_loaders(cfg)
    # A fixed slice of the data, the same for both modes: steps batches per stage.
    batches = []
    for i, b in enumerate(train):
        if i >= steps:
            break
        batches.append(b)
    out: dict = {"mode": mode, "depth": depth}
    if mode == "progressive":
        builder = ProgressiveRackBuilder(cfg, "append")
        res = ProgressiveTrainer(cfg).train_rack(builder, batches, eval_loader=batches[:4])
        out["stage_step_ms"] = [statistics.median(h["step_ms"]) for h in res["history"]]
        out["cache_fill_s"] = [h["cache_fill_s"] for h in res["history"]]
        out["final_eval_loss"] = res["history"][-1]["eval_loss"]
        out["tokens"] = sum(h["tokens"] for h in res["history"])
    else:
        from stackwise.model.architecture import Rack
        from stackwise.training.strategies.masking import token_loss

        rack = Rack.from_config(cfg.model)
        opt = torch.optim.AdamW(rack.parameters(), lr=cfg.training.learning_rate)
        total = steps * (depth // 2)  # as many steps as all progressive stages together
        times = []
        for step in range(total):
            b = batches[step % len(batches)]
            t0 = time.perf_counter()
            loss = token_loss(rack(b["input_ids"]), b["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        out["step_ms"] = 1e3 * statistics.median(times)
        with torch.no_grad():
            out["final_eval_loss"] = statistics.mean(
                float(token_loss(rack(b["input_ids"]), b["labels"])) for b in batches[:4]
            )
        out["tokens"] = total * cfg.training.batch_size * cfg.training.seq_len
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--json", default="bench/results/e2e_depth.json")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "DEPTH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.steps, args.d_model)))
        return 0
    rows = []
    for depth in args.depths:
        for mode in ("progressive", "end_to_end"):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                mode,
                str(depth),
                "--steps",
                str(args.steps),
                "--d-model",
                str(args.d_model),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return 1
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(
        f"{'depth':>5} {'mode':<12} {'step ms (stage 1 .. N)':<34} {'peak RSS MB':>11} "
        f"{'eval loss':>9}"
    )
    for r in rows:
        if r["mode"] == "progressive":
            st = r["stage_step_ms"]
            steps = f"{st[0]:.1f} .. {st[-1]:.1f} (x{st[-1] / st[0]:.2f})"
        else:
            steps = f"{r['step_ms']:.1f}"
        print(
            f"{r['depth']:>5} {r['mode']:<12} {steps:<34} {r['peak_rss_mb']:>11.0f} "
            f"{r['final_eval_loss']:>9.3f}"
        )
    from harness import environment
    from stackwise._io import atomic_write_text

    env = environment("cpu")
    atomic_write_text(
        args.json,
        json.dumps({"benchmark": "e2e_depth", "environment": env, "rows": rows}, indent=2),
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
