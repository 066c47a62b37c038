"""One rank of a data-parallel final evaluation, for test_eval_distributed.py (launched with
``torchrun --standalone --nproc_per_node=2``): loads a trained run, joins the job, evaluates the
validation split and writes ``<out>/rank<r>.json`` with the figures and the number of batches
this rank scored itself.

    torchrun --standalone --nproc_per_node=2 _eval_worker.py RUN_DIR OUT_DIR BATCH_SIZE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    import stackwise.ops
    from stackwise.run.evaluate import evaluate_run, load_run
    from stackwise.training.distributed import DistributedContext

    run_dir, out, batch_size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    run = load_run(run_dir, device="cpu")
    run.config.training.distributed.strategy = "ddp"
    ctx = DistributedContext.from_env(run.config)
    calls = []
    scorer = stackwise.ops.linear_cross_entropy_with_predictions

    def counting(*args, **kwargs):
        calls.append(1)
        return scorer(*args, **kwargs)

    stackwise.ops.linear_cross_entropy_with_predictions = counting
    try:
        result = evaluate_run(run, "val", batch_size=batch_size)
    finally:
        ctx.shutdown()
    report = {"rank": ctx.rank, "world": ctx.world_size, "batches": len(calls), **result}
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
