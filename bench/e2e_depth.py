"""Depth benchmark: progressive training with cached trunk activations against end-to-end
training of the same rack, at depth 2, 4, 8 and 16 blocks.

Same data (the pydoc corpus, byte tokenizer), same width, same steps per stage. Each
configuration runs in its own subprocess, which reports its step times and its peak resident
memory (ru_maxrss); on CUDA the peak of torch.cuda.max_memory_allocated as well. Progressive
stacks are 2 blocks each; stage N's step time excludes the one-off pass that fills the cache
(reported separately).

Quality at equal tokens: end-to-end training takes as many steps as all progressive stages
together, on the same batches, so both have read the same number of training tokens (the
``tokens`` column, checked equal); each reports the final rack's loss on the same held-out
batches (the first ``--eval-batches`` of the validation split), computed by the same function.
Both use the configured optimizer, warmup/cosine schedule and gradient clipping.

    python bench/e2e_depth.py [--depths 2 4 8 16] [--steps 20] [--d-model 256]
                              [--eval-batches 4] [--json bench/results/e2e_depth.json]
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


def worker(mode: str, depth: int, steps: int, d_model: int, eval_batches: int) -> dict:
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
    held_out = []
    for i, b in enumerate(val):
        if i >= eval_batches:
            break
        held_out.append(b)
    trainer = ProgressiveTrainer(cfg)
    out: dict = {"mode": mode, "depth": depth}
    if mode == "progressive":
        builder = ProgressiveRackBuilder(cfg, "append")
        res = trainer.train_rack(builder, batches)
        rack = res["rack"]
        out["stage_step_ms"] = [statistics.median(h["step_ms"]) for h in res["history"]]
        out["cache_fill_s"] = [h["cache_fill_s"] for h in res["history"]]
        out["tokens"] = sum(h["tokens"] for h in res["history"])
        out["final_train_loss"] = res["history"][-1]["losses"][-1]
    else:
        from stackwise.model.architecture import Rack
        from stackwise.training.optim import build_optimizer, clip_gradients, lr_lambda
        from stackwise.training.strategies.masking import token_loss

        dev = trainer.device  # the device the progressive run trains on
        rack = Rack.from_config(cfg.model).to(dev)
        opt_cfg = cfg.training.optimizer
        params = [p for p in rack.parameters() if p.requires_grad]
        opt = build_optimizer(
            [{"name": "rack", "params": params, "lr": cfg.training.learning_rate}], opt_cfg
        )
        total = steps * (depth // 2)  # as many steps as all progressive stages together
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(opt_cfg, total))
        times, tokens = [], 0
        for step in range(total):
            b = batches[step % len(batches)]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = token_loss(rack(b["input_ids"].to(dev)), b["labels"].to(dev))
            loss.backward()
            clip_gradients(params, opt_cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            tokens += int((b["labels"] != -100).sum())
        out["step_ms"] = 1e3 * statistics.median(times)
        out["tokens"] = tokens
        out["final_train_loss"] = float(loss)
    out["final_eval_loss"] = trainer.evaluate(rack, held_out, 0.0)
    out["eval_tokens"] = sum(int(b["labels"].numel()) for b in held_out)
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
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches to evaluate")
    p.add_argument("--json", default="bench/results/e2e_depth.json")
    p.add_argument("--worker", nargs=2, metavar=("MODE", "DEPTH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        mode, depth = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(mode, depth, args.steps, args.d_model, args.eval_batches)))
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
                "--eval-batches",
                str(args.eval_batches),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return 1
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(
        f"{'depth':>5} {'mode':<12} {'step ms (stage 1 .. N)':<34} {'peak RSS MB':>11} "
        f"{'tokens':>8} {'eval loss':>9}"
    )
    for r in rows:
        if r["mode"] == "progressive":
            st = r["stage_step_ms"]
            steps = f"{st[0]:.1f} .. {st[-1]:.1f} (x{st[-1] / st[0]:.2f})"
        else:
            steps = f"{r['step_ms']:.1f}"
        print(
            f"{r['depth']:>5} {r['mode']:<12} {steps:<34} {r['peak_rss_mb']:>11.0f} "
            f"{r['tokens']:>8} {r['final_eval_loss']:>9.3f}"
        )
    print("\nfinal held-out loss at equal training tokens (progressive - end-to-end):")
    for depth in args.depths:
        pair = {r["mode"]: r for r in rows if r["depth"] == depth}
        prog, e2e = pair["progressive"], pair["end_to_end"]
        if prog["tokens"] != e2e["tokens"]:
            print(f"depth {depth}: token counts differ ({prog['tokens']} vs {e2e['tokens']})")
            return 1
        diff = prog["final_eval_loss"] - e2e["final_eval_loss"]
        print(
            f"{depth:>5} blocks, {prog['tokens']} tokens: {prog['final_eval_loss']:.3f} vs "
            f"{e2e['final_eval_loss']:.3f} ({diff:+.3f})"
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
