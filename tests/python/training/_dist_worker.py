"""One rank of a small data-parallel progressive run, for test_distributed.py (launched with
``torchrun --standalone --nproc_per_node=W``) and for the 1-process reference (imported).

Trains the counting task (token t+1 = token t + 1 mod VOCAB - 1) on global batches of GLOBAL_B
and writes ``<out>/rank<r>.json`` (per-stage losses, spill files seen, cache stats) and, from
rank 0, ``<out>/final.safetensors`` (the rack's weights).

    torchrun --standalone --nproc_per_node=2 _dist_worker.py --out DIR [--strategy ddp|fsdp]
        [--ckpt DIR] [--resume] [--every-steps K] [--target-stacks N] [--fail-rank R]
        [--spill] [--loader]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/python, under torchrun
from utils import tiny_model  # noqa: E402

VOCAB = 24
GLOBAL_B = 8
STEPS = 6


def make_config(
    strategy="ddp", every_steps=0, spill_dir=None, accum=1, timeout_s=60.0, qlora=False
):
    from stackwise.config.base import StackWiseConfig

    return StackWiseConfig.from_dict(
        {
            "model": tiny_model(VOCAB, use_rope=True, attention_mode="causal"),
            "training": {
                "device": "cpu",
                "learning_rate": 3e-3,
                "batch_size": GLOBAL_B,
                "seq_len": 16,
                "max_steps": 0,
                "qlora_enabled": False,
                "time_step_masking": False,
                "optimizer": {
                    "warmup_steps": 0,
                    "grad_clip": 1.0,
                    "weight_decay": 0.0,
                    "grad_accumulation": accum,
                },
                "progressive": {
                    "target_stacks": 2,
                    "steps_per_stack": STEPS,
                    "trunk_strategy": "qlora" if qlora else "frozen",
                },
                "quantization_enabled": qlora,
                "quantization_type": "nf4",
                "qlora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "lr": 1e-2},
                "caching": {
                    "max_cache_size": 1 if spill_dir else 1000,
                    "spill_dir": spill_dir,
                    "storage_precision": "as_is",
                },
                "checkpointing": {"every_steps": every_steps, "keep_last": 10},
                "distributed": {"strategy": strategy, "timeout_s": timeout_s},
            },
        }
    ).validate()


def make_data(n_batches=4, b=GLOBAL_B, s=16, seed=0):
    """Global batches of the counting task (no sample ids: the default global ones apply)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        start = torch.randint(0, VOCAB - 1, (b, 1), generator=g)
        out.append((start + torch.arange(s)) % (VOCAB - 1))
    return out


class _FailingBatches(list):
    """Raises on its third batch on one rank."""

    def __init__(self, batches, fail: bool) -> None:
        super().__init__(batches)
        self.fail = fail

    def __iter__(self):
        for i, b in enumerate(super().__iter__()):
            if self.fail and i == 2:
                raise RuntimeError("injected failure on this rank")
            yield b


class _StepLog:
    """A callback writing one line per step to ``<out>/steps-rank<RANK>.txt``."""

    def __init__(self, out: Path) -> None:
        self.path = out / f"steps-rank{os.environ.get('RANK', '0')}.txt"

    def on_step(self, info) -> None:
        with open(self.path, "a") as f:
            f.write(f"{info['global_step']} {info['loss']}\n")


def _loader_factory(args):
    def make(ctx):
        if args.loader:  # a torch DataLoader of dict samples, per-rank via RankShardSampler
            from torch.utils.data import DataLoader

            from stackwise.data.sharding import RankShardSampler

            data = torch.cat(make_data())
            items = [{"input_ids": row, "sample_id": i} for i, row in enumerate(data)]
            sampler = RankShardSampler(len(items), ctx.rank, ctx.world_size, GLOBAL_B, seed=3)
            return DataLoader(items, batch_size=GLOBAL_B // ctx.world_size, sampler=sampler)
        data = make_data()
        if args.fail_rank is not None:
            return _FailingBatches(data, ctx.rank == args.fail_rank)
        return data

    return make


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--ckpt")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--every-steps", type=int, default=0)
    p.add_argument("--target-stacks", type=int, default=2)
    p.add_argument("--fail-rank", type=int)
    p.add_argument("--spill", action="store_true")
    p.add_argument("--loader", action="store_true")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--qlora", action="store_true")
    p.add_argument("--eval", action="store_true")
    p.add_argument("--plain", action="store_true", help="ProgressiveTrainer joins by itself")
    args = p.parse_args(argv)
    from safetensors.torch import save_file

    from stackwise.run.launch import train_distributed

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spill = str(out / "spill") if args.spill else None
    config = make_config(args.strategy, args.every_steps, spill, args.accum, qlora=args.qlora)
    torch.manual_seed(0)
    if args.plain:
        from stackwise.training import ProgressiveRackBuilder, ProgressiveTrainer

        builder = ProgressiveRackBuilder(config)
        trainer = ProgressiveTrainer(config, callbacks=[_StepLog(out)])
        res = trainer.train_rack(builder, make_data(), target_stacks=args.target_stacks)
        res.update(context=trainer.dist, trainer=trainer)
    else:
        res = train_distributed(
            config,
            _loader_factory(args),
            checkpoint_dir=args.ckpt,
            target_stacks=args.target_stacks,
            resume=args.resume,
            eval_loader_factory=(lambda ctx: make_data(2, seed=9)) if args.eval else None,
            callbacks=[_StepLog(out)],
        )
    ctx = res["context"]
    spill_dirs = []
    if spill:
        spill_dirs = [os.path.relpath(root, spill) for root, _, _ in os.walk(spill)]
    report = {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "losses": [h["losses"] for h in res["history"]],
        "eval_loss": [h.get("eval_loss") for h in res["history"]],
        "tokens": [h["tokens"] for h in res["history"]],
        "spill_dirs": sorted(spill_dirs),
        "cache_spill_dir": res["trainer"].cache.spill_dir,
        "cache": res["history"][-1].get("cache"),
    }
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(report, default=float))
    if ctx.is_main:
        state = {k: v.detach().contiguous().cpu() for k, v in res["rack"].state_dict().items()}
        save_file(state, str(out / "final.safetensors"))
    ctx.barrier()
    ctx.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
