"""``train_distributed``: one rank's share of a data-parallel progressive run under ``torchrun``
(or the whole run in one process).

    ctx-aware loader factory, then:
    results = train_distributed(config, lambda ctx: train_batches, checkpoint_dir="ckpt")

Each rank joins the job (:meth:`DistributedContext.from_env`), builds the rack builder and the
:class:`~stackwise.training.progressive.ProgressiveTrainer`, and trains; an error on a rank is
printed as ``rank N: <error>`` to stderr and re-raised, so the process exits non-zero and
torchrun stops the other ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from stackwise.training.distributed import DistributedContext, report_rank_error
from stackwise.training.progressive import ProgressiveTrainer
from stackwise.training.rack_builder import ProgressiveRackBuilder


def train_distributed(
    config,
    dataloader_factory: Callable[[DistributedContext], Any],
    *,
    checkpoint_dir: str | None = None,
    target_stacks: int | None = None,
    eval_loader_factory: Callable[[DistributedContext], Any] | None = None,
    resume: bool = False,
    building_mode: str | None = None,
    tokenizer_ids: dict[str, int] | None = None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """``dataloader_factory(ctx)`` returns the global batches (sliced per rank by the trainer)
    or a per-rank loader (``create_data_loaders(config, distributed=ctx)``). Returns
    ``train_rack``'s result plus ``"context"``, ``"builder"`` and ``"trainer"``."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        ctx = DistributedContext.from_env(config)
        rank = ctx.rank
        mode = building_mode or config.training.progressive.building_mode
        builder = ProgressiveRackBuilder(config, building_mode=mode)
        trainer = ProgressiveTrainer(
            config,
            tokenizer_ids=tokenizer_ids,
            checkpoint_dir=checkpoint_dir,
            callbacks=callbacks,
            distributed=ctx,
        )
        loader = dataloader_factory(ctx)
        eval_loader = None if eval_loader_factory is None else eval_loader_factory(ctx)
        results = trainer.train_rack(
            builder, loader, target_stacks=target_stacks, eval_loader=eval_loader, resume=resume
        )
        ctx.barrier()
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt):
            report_rank_error(exc, rank)
        raise
    results["context"] = ctx
    results["builder"] = builder
    results["trainer"] = trainer
    return results


__all__ = ["train_distributed"]
