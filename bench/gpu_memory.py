"""Accelerator memory in depth: peak ``torch.cuda.max_memory_allocated`` of progressive training
(stacks of one block, frozen fp32 trunk read from the activation cache) at 2, 4, 8 and 16 blocks
against training the same rack end to end, each next to the memory planner's prediction
(``stackwise plan``: weights + gradients + optimizer + saved activations of the largest stage).

The promise measured: progressive training's peak stays nearly flat in depth (the trunk's frozen
weights grow, nothing else), end-to-end training's grows with every block. The rack: d_model
2048 (16 heads of 128, 4 KV heads), SwiGLU d_ff 5632, vocabulary 32000, micro-batch 8 x 1024
tokens, bf16 autocast, AdamW; random tokens, 2 optimizer steps per stage. The end-to-end
baseline is a plain loop over the same rack (forward, loss, backward, AdamW step).

    python bench/gpu_memory.py [--json bench/results/gpu/memory.json] [--depths 2 4 8 16]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

from stackwise._io import atomic_write_text
from stackwise.config.base import StackWiseConfig
from stackwise.run.plan import GiB, plan_memory

VOCAB, BATCH, SEQ = 32000, 8, 1024


def make_config(depth: int):
    return StackWiseConfig.from_dict(
        {
            "model": {
                "vocab_size": VOCAB,
                "d_model": 2048,
                "n_heads": 16,
                "n_kv_heads": 4,
                "d_ff": 5632,
                "n_layers": depth,
                "attention_type": "gqa",
                "use_rope": True,
                "max_seq_len": SEQ,
                "architecture": {"n_stacks": depth, "blocks_per_stack": 1},
            },
            "training": {
                "batch_size": BATCH,
                "seq_len": SEQ,
                "max_steps": 0,
                "device": "cuda",
                "autocast": True,
                "qlora_enabled": False,
                "time_step_masking": False,
                "checkpointing": {"enabled": False},
                "progressive": {"target_stacks": depth, "steps_per_stack": 2},
                "caching": {"max_memory_mb": 65536},
            },
        }
    ).validate()


def _data(n: int = 2):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)} for _ in range(n)]


def _reset() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def progressive_peak(config) -> float:
    from stackwise.training import ProgressiveRackBuilder, ProgressiveTrainer

    _reset()
    ProgressiveTrainer(config).train_rack(
        ProgressiveRackBuilder(config),
        _data(),
        target_stacks=config.training.progressive.target_stacks,
    )
    return torch.cuda.max_memory_allocated() / GiB


def end_to_end_peak(config) -> float:
    import torch.nn.functional as F

    from stackwise.model.architecture import Rack

    _reset()
    rack = Rack.from_config(config.model).cuda()
    opt = torch.optim.AdamW(rack.parameters(), lr=1e-4)
    for batch in _data():
        ids = batch["input_ids"].cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = rack(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    del rack, opt
    return torch.cuda.max_memory_allocated() / GiB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/gpu/memory.json")
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_memory: no CUDA device visible", file=sys.stderr)
        return 2
    rows = []
    for depth in args.depths:
        config = make_config(depth)
        row: dict = {"blocks": depth}
        for name, fn, e2e in (
            ("progressive", progressive_peak, False),
            ("end_to_end", end_to_end_peak, True),
        ):
            plan = plan_memory(config, end_to_end=e2e)
            row[f"{name}_planned_gib"] = max(s.total for s in plan.stages) / GiB
            t0 = time.perf_counter()
            try:
                row[f"{name}_peak_gib"] = fn(config)
            except torch.cuda.OutOfMemoryError as exc:
                row[f"{name}_error"] = f"out of memory: {str(exc).splitlines()[0]}"
            except Exception as exc:  # recorded, the other measurements still run
                row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
            row[f"{name}_s"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"device": torch.cuda.get_device_name(), "batch": [BATCH, SEQ], "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.json), json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
