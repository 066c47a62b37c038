"""``ProgressiveTrainer``: trains a rack stack by stack.

    trainer = ProgressiveTrainer(config=config, checkpoint_dir="ckpt")
    results = trainer.train_rack(rack_builder, dataloader, target_stacks=3, resume=True)

One stage, as :meth:`ProgressiveTrainer._run_stage` reads::

    add a stack -> freeze the rest (:meth:`_stage_groups`) -> fill the cache -> step, step, step
    (:class:`~stackwise.training.loop.TrainLoop`) -> evaluate -> checkpoint

- **append** (left to right): stack s trains on top of the frozen trunk (stacks 0..s-1). The
  trunk's output for each batch is computed once, stored in the activation cache, and read back
  for every step of the stage, so the trunk is not recomputed. With a ``qlora`` trunk the trunk's
  LoRA adapters train too, so the cache holds the trunk's *input* (the embeddings) and the trunk
  runs with gradients flowing into the adapters only. Embeddings (and a time embedding) train
  with stack 0 and are frozen afterwards (cached activations stay valid); the final norm and head
  train at every stage.
- **prepend** (right to left, depth as time): stack 0 trains with the head at the lowest mask
  ratio; each new stack is inserted on the left and trained at a higher ratio through the frozen
  suffix and head; the (frozen) embeddings of the corrupted input are what is cached.

Mask ratio of a stage: the ``training.masking`` schedule at the stack's position (highest on the
left in prepend mode); ``training.time_step_masking: false`` uses ``max_fraction`` at every
stage; ``time_interpretation: input`` draws one noise level per sample instead (see
:mod:`stackwise.training.step`).

Optimizer groups: ``current_stack``, ``current_stack_lora`` (dual-LoRA, at ``qlora.lr``),
``head``, ``embeddings`` and ``time_embedding`` (stage 0), ``qlora_trunk`` (every trunk adapter,
at ``qlora.lr``). ``training.seed`` seeds torch, ``random`` and numpy when a fresh trainer first
trains; ``training.max_steps`` (> 0) caps the steps of all stages together.

Checkpoints (with ``checkpoint_dir`` and ``training.checkpointing.enabled``): at each stage's end
and every ``checkpointing.every_steps`` global steps; :meth:`resume` or ``train_rack(...,
resume=True)`` continues from the newest one exactly: same batches, masks, RNG draws, optimizer
and LR state, so the losses and weights match a run that was never interrupted.

A batch is a LongTensor [B, S] of token ids or a dict with ``input_ids`` and optionally
``attention_mask`` (True = real token), ``labels`` and ``sample_id`` (see ``batches.py``).
"""

from __future__ import annotations

import math
import os
import random
from typing import Any

import torch

from stackwise.exceptions import TrainingError
from stackwise.training.batches import check_loader, loader_generator
from stackwise.training.checkpoint import (
    ResumeState,
    checkpoint_building_mode,
    checkpoint_name,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from stackwise.training.consolidation import consolidate, set_trunk_recompute
from stackwise.training.distributed import DistributedContext, active_context
from stackwise.training.growth import init_new_stack, stage_noise_range, stage_steps_share
from stackwise.training.loop import (
    TrainLoop,
    Unit,
    call_callbacks,
    count_batches,
    rack_stacks,
    stage_cache,
)
from stackwise.training.parallel import DataParallel
from stackwise.training.rack_builder import ProgressiveRackBuilder
from stackwise.training.step import BatchStep, resolve_device
from stackwise.training.strategies.caching import CacheManager
from stackwise.training.strategies.masking import MaskScheduler
from stackwise.training.units import (
    embedding_parameters,
    head_parameters,
    trainable_parameters,
)


class ProgressiveTrainer:
    """See the module docstring. ``config`` is a :class:`StackWiseConfig`. ``distributed``: a
    :class:`~stackwise.training.distributed.DistributedContext` (default: the active one, or the
    job's under torchrun). ``callbacks``: objects with any of ``on_stage_start(info)``,
    ``on_step(info)``, ``on_eval(info)``, ``on_stage_end(record)``."""

    def __init__(
        self,
        config,
        tokenizer_ids: dict[str, int] | None = None,
        checkpoint_dir: str | None = None,
        callbacks: list | None = None,
        distributed: DistributedContext | None = None,
    ) -> None:
        self.config = config
        self.callbacks = list(callbacks or [])
        self.checkpoint_dir = checkpoint_dir
        self.training = config.training
        self.progressive = config.training.progressive
        ctx = distributed if distributed is not None else active_context()
        if ctx is None and (
            torch.distributed.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1
        ):
            ctx = DistributedContext.from_env(config)  # under torchrun: join the job
        self.parallel = DataParallel(ctx)
        self.device = self.parallel.ctx.device if self.parallel.enabled else None
        self.device = self.device or resolve_device(self.training.device)
        self.step = BatchStep(config, self.device, tokenizer_ids)
        self.loop = TrainLoop(config, self.step, self.parallel, self._new_cache, self._emit)
        self.seed = self.training.seed
        self.history: list[dict[str, Any]] = []
        self._seeded = False  # training.seed applied (or RNG restored from a checkpoint)
        self._resume: ResumeState | None = None  # set by resume()

    # -- small things ---------------------------------------------------------------------------

    @property
    def dist(self) -> DistributedContext | None:
        """The data-parallel context (None in one process)."""
        return self.parallel.ctx

    @property
    def cache(self) -> CacheManager | None:
        return self.loop.cache

    def set_tokenizer_ids(self, tokenizer_ids: dict[str, int] | None) -> None:
        """The mask id and the special ids (never masked) of the objective."""
        self.step.set_tokenizer_ids(tokenizer_ids)

    def _emit(self, event: str, info: dict[str, Any]) -> None:
        if self.parallel.is_main:  # callbacks (logging) run on rank 0 only
            call_callbacks(self.callbacks, event, info)

    def _new_cache(self) -> CacheManager:
        cm = self.training.caching
        return stage_cache(cm, self.parallel.spill_dir(cm.spill_dir))

    @property
    def global_step(self) -> int:
        """Optimizer steps taken over all finished stages."""
        return sum(int(h.get("steps", 0)) for h in self.history)

    @property
    def input_time(self) -> bool:
        return self.step.input_time

    def _seed_everything(self) -> None:
        torch.manual_seed(self.seed)  # CPU and every CUDA device
        random.seed(self.seed)
        try:
            import numpy as np
        except ImportError:
            return
        np.random.seed(self.seed % 2**32)

    def stage_ratio(self, stage: int, target: int) -> float | tuple[float, float]:
        """Mask ratio of the stack trained at ``stage`` in a rack of ``target`` stacks (with
        ``time_interpretation: input``, the mean of the per-sample noise levels); with
        ``noise_ranges``, the stage's range ``(lo, hi)`` (a ratio per sample drawn in it)."""
        m = self.training.masking
        if self.progressive.noise_ranges != "none":
            return stage_noise_range(
                m.min_fraction, m.max_fraction, self.progressive.noise_ranges, stage, target
            )
        if self.input_time:
            return 0.5 * (m.min_fraction + m.max_fraction)
        if not self.training.time_step_masking:
            return m.max_fraction
        prepend = self.progressive.building_mode == "prepend"
        sched = MaskScheduler(m.min_fraction, m.max_fraction, m.schedule, reverse=prepend)
        position = target - 1 - stage if prepend else stage
        return sched.get_mask_fraction(position, target)

    def evaluate(self, rack, loader, ratio: float, max_batches: int = 50) -> float:
        """Mean loss per target token of the whole rack on ``loader`` at mask ratio ``ratio``
        (the RNG and the train/eval mode are left as they were)."""
        self.parallel.sync_weights()
        cap = self.training.eval_max_tokens
        return self.step.evaluate(rack, rack_stacks(rack), loader, ratio, max_batches, cap)

    # -- the run --------------------------------------------------------------------------------

    def train_rack(
        self,
        rack_builder: ProgressiveRackBuilder,
        dataloader,
        target_stacks=None,
        eval_loader=None,
        resume: bool = False,
    ) -> dict[str, Any]:
        """Grow the rack to ``target_stacks`` stacks (default: the configured target), training
        each new stack; calling again with a larger target continues from the current rack.
        ``resume=True``: first load the newest checkpoint of ``checkpoint_dir`` (if there is
        one) into this trainer and the empty ``rack_builder``, and continue from it."""
        target = self.progressive.target_stacks if target_stacks is None else target_stacks
        if isinstance(target, bool) or not isinstance(target, int) or target < 1:
            raise TrainingError(f"target_stacks must be an integer >= 1, got {target!r}")
        check_loader(dataloader)
        dataloader = self.parallel.shard(dataloader)  # this rank's share of each global batch
        if resume:
            if self.checkpoint_dir is None:
                raise TrainingError("resume=True needs the trainer's checkpoint_dir")
            fresh = not self.history and self._resume is None
            if fresh and has_checkpoint(self.checkpoint_dir):
                self._load(rack_builder)
        if not self._seeded:
            self._seed_everything()
            self._seeded = True
        if rack_builder.building_mode != self.progressive.building_mode:
            self.progressive.building_mode = rack_builder.building_mode
        rack_builder.rack.to(self.device)
        n_batches = count_batches(dataloader)
        if n_batches == 0:
            raise TrainingError("the dataloader yielded no batches")
        # Mask ratios follow the planned depth (the configured target, or more), so a rack grown
        # over several calls gets the same schedule as one grown in one call.
        plan = max(target, self.progressive.target_stacks)
        resumed, self._resume = self._resume, None
        stopped = None
        if resumed is not None:
            pending = resumed.progress
            if pending is not None:  # finish the stage the checkpoint was taken in
                self._run_stage(
                    rack_builder, dataloader, pending.stage, pending.plan, eval_loader,
                    pending.steps, n_batches, resumed,
                )  # fmt: skip
            else:
                gen = loader_generator(dataloader)
                if gen is not None and "loader.now" in resumed.extra_rng:
                    gen.set_state(resumed.extra_rng["loader.now"])
        while rack_builder.n_stacks < target:
            stage = rack_builder.n_stacks
            steps = self._stage_steps(n_batches, plan, stage)
            if steps <= 0:
                stopped = "max_steps"
                break
            rack_builder.add_stack(precision=self._trunk_precision())
            new_idx = rack_builder.n_stacks - 1 if rack_builder.building_mode == "append" else 0
            init_new_stack(rack_builder, new_idx, self.progressive.new_stack_init)
            rack_builder.rack.to(self.device)
            self._run_stage(rack_builder, dataloader, stage, plan, eval_loader, steps, n_batches)
        cons = self.progressive.consolidation_steps
        if cons and stopped is None and not any(h.get("phase") for h in self.history):
            args = (dataloader, eval_loader, cons, plan)
            self.history.append(consolidate(self, rack_builder, *args))
        return {
            "history": self.history,
            "final": self.history[-1] if self.history else {},
            "rack": rack_builder.rack,
            "stopped": stopped,
        }

    def _run_stage(
        self, builder, dataloader, stage, plan, eval_loader, steps, n_batches, resumed=None
    ) -> None:
        """Freeze, train one stage through the loop, record it, write its checkpoint."""
        rack = builder.rack
        append = builder.building_mode == "append"
        new_idx = len(rack.stacks) - 1 if append else 0
        first = stage == 0
        qlora = self.progressive.trunk_strategy == "qlora"
        groups = self._stage_groups(builder, stage, plan, new_idx)
        set_trunk_recompute(rack, {new_idx}, self.progressive.trunk_checkpointing)
        ratio = self.stage_ratio(stage, plan)
        # Which boundary the stage reads: append -> the trunk's output (its input with a qlora
        # trunk, whose adapters train); prepend -> the embeddings. Stage 0 reads raw ids, since
        # the embeddings train with it.
        boundary = 0 if (qlora or not append) else new_idx
        identity = {
            "stage": stage,
            "stack_index": new_idx,
            "n_stacks": len(rack.stacks),
            "target_stacks": plan,
            "mask_ratio": (
                0.0 if self.progressive.training_objective == "clm" else sum(ratio) / len(ratio)
            )
            if isinstance(ratio, tuple)
            else (ratio if self.progressive.training_objective != "clm" else 0.0),
        }
        unit = Unit(
            label=f"stage {stage} (stack {new_idx})",
            model=rack,
            modules_of=rack_stacks,
            start=boundary,
            end=len(rack.stacks),
            groups=groups,
            steps=steps,
            ratio=ratio,
            cached=self.progressive.cache_activations and not first,
            identity=identity,
            index=stage,
            plan=plan,
            start_event="on_stage_start",
            end_event="on_stage_end",
        )
        checkpointing = self.checkpoint_dir is not None and self.training.checkpointing.enabled
        record = self.loop.run(
            unit,
            dataloader,
            n_batches,
            eval_loader=eval_loader,
            checkpoint=self._mid_stage_checkpoint(builder) if checkpointing else None,
            resume=resumed,
            base_step=self.global_step,
            checkpoint_dir=self.checkpoint_dir,
        )
        record.pop("target_stacks", None)
        self.history.append(record)
        if checkpointing:
            gen = loader_generator(dataloader)
            extra = {} if gen is None else {"loader.now": gen.get_state()}
            self._save(builder, None, None, None, extra)

    # -- checkpoints ----------------------------------------------------------------------------

    def _save(self, builder, progress, optimizer, scheduler, extra_rng):
        name = None if progress is None else checkpoint_name(progress.stage, progress.step)
        keep_last = self.training.checkpointing.keep_last

        def write(opt):
            return save_checkpoint(
                self.checkpoint_dir, builder, self.history, keep_last, progress, opt, scheduler,
                extra_rng,
            )  # fmt: skip

        return self.parallel.save(write, self.checkpoint_dir, name, optimizer)

    def _mid_stage_checkpoint(self, builder):
        def checkpoint(progress, optimizer, scheduler, extra_rng):
            self._save(builder, progress, optimizer, scheduler, extra_rng)

        return checkpoint

    def _load(self, builder: ProgressiveRackBuilder) -> None:
        if self.history:
            raise TrainingError("resuming needs a trainer that has not trained yet")
        self.history, self._resume = load_checkpoint(
            self.checkpoint_dir, builder, self.training.qlora
        )
        self._seeded = True  # the RNG continues from the checkpoint, not from training.seed

    @classmethod
    def resume(cls, checkpoint_dir: str, config, **kwargs):
        """``(trainer, rack_builder)`` from the newest checkpoint in ``checkpoint_dir`` (at a
        stage's end or within a stage); ``trainer.train_rack(rack_builder, ...)`` with the same
        loaders continues exactly. ``kwargs`` go to the constructor (``tokenizer_ids``,
        ``callbacks``)."""
        mode = checkpoint_building_mode(checkpoint_dir)
        builder = ProgressiveRackBuilder(config, building_mode=mode)
        trainer = cls(config, checkpoint_dir=str(checkpoint_dir), **kwargs)
        trainer._load(builder)
        return trainer, builder

    # -- what trains ----------------------------------------------------------------------------

    def _trunk_precision(self) -> str:
        if not self.training.quantization_enabled:
            return "full"
        q = self.training.quantization_type
        return {"fp32": "full", "fp16": "half", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8"}.get(q, q)

    def _stage_steps(self, n_batches: int, plan: int, stage: int) -> int:
        """Optimizer steps of ``stage``: ``steps_per_stack``, else ``max_steps`` split over the
        planned stages, else ``epochs_per_stack`` passes; never beyond what ``max_steps``
        leaves."""
        p, max_steps = self.progressive, self.training.max_steps
        if max_steps:  # the consolidation phase takes its steps from the same budget
            max_steps -= p.consolidation_steps
        accum = self.training.optimizer.grad_accumulation
        if p.steps_per_stack:
            steps = p.steps_per_stack
        elif max_steps:
            steps = stage_steps_share(max_steps, plan, stage, p.stage_budget)
        else:
            steps = math.ceil(p.epochs_per_stack * n_batches / accum)
        if max_steps:
            steps = min(steps, max_steps - self.global_step)
        return steps

    def _stage_groups(self, builder, stage: int, plan: int, new_idx: int) -> list[dict]:
        """Freeze what does not train at this stage and return the optimizer groups."""
        rack = builder.rack
        cfg, prog = self.training, self.progressive
        append = builder.building_mode == "append"
        for i in range(len(rack.stacks)):
            if i != new_idx:
                rank, alpha = builder.trunk_rank(i, plan, cfg.qlora)
                builder.freeze_stack(i, prog.trunk_strategy, cfg.qlora, rank=rank, alpha=alpha)
        lora_ids = {id(p) for p in builder.stack_lora_parameters(new_idx)}
        stack_params = trainable_parameters(rack.stacks[new_idx])
        first = stage == 0
        emb_params = embedding_parameters(rack, first)
        time_params = [] if rack.time_embedding is None else list(rack.time_embedding.parameters())
        for p in time_params:
            p.requires_grad_(first)
        head_trains = append or first
        head_params = head_parameters(rack, head_trains)
        lr = cfg.learning_rate * (1.0 if first else prog.stage_lr_scale)
        groups = [
            {
                "name": "current_stack",
                "params": [p for p in stack_params if id(p) not in lora_ids],
                "lr": lr,
            }
        ]
        lora = [p for p in stack_params if id(p) in lora_ids]
        if lora:
            groups.append({"name": "current_stack_lora", "params": lora, "lr": cfg.qlora.lr})
        if head_trains:
            groups.append({"name": "head", "params": head_params, "lr": lr})
        if first:
            groups.append({"name": "embeddings", "params": emb_params, "lr": lr})
            if time_params:
                groups.append({"name": "time_embedding", "params": time_params, "lr": lr})
        if prog.trunk_strategy == "qlora" and not first:
            trunk = builder.trunk_adapter_parameters(exclude=new_idx)
            for p in trunk:
                p.requires_grad_(True)
            groups.append({"name": "qlora_trunk", "params": trunk, "lr": cfg.qlora.lr})
        return groups


__all__ = ["ProgressiveTrainer"]
