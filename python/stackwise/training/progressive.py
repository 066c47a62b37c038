"""``ProgressiveTrainer``: trains a rack stack by stack.

    trainer = ProgressiveTrainer(config=config, checkpoint_dir="ckpt")
    results = trainer.train_rack(rack_builder, dataloader, target_stacks=3, resume=True)

- **append** (left to right): stack s trains on top of the frozen trunk (stacks 0..s-1). The
  trunk's output for each batch is computed once, stored in the :class:`CacheManager`, and read
  back for every step of the stage, so the trunk is not recomputed. With a ``qlora`` trunk the
  trunk's LoRA adapters train too, so the cache holds the trunk's *input* (the embeddings) and the
  trunk runs with gradients flowing into the adapters only. Embeddings (and a time embedding)
  train with stack 0 and are frozen afterwards (cached activations stay valid); the final norm
  and head train at every stage.
- **prepend** (right to left, depth as time): stack 0 trains with the head at the lowest mask
  ratio; each new stack is inserted on the left and trained at a higher ratio through the frozen
  suffix and head; the (frozen) embeddings of the corrupted input are what is cached.

Objectives (``training.progressive.training_objective``): ``clm`` (next token), ``mlm`` (80/10/10
corruption at the stage's ratio) and ``diffusion`` (absorbing-mask corruption at the stage's
ratio r_k from the :class:`MaskScheduler`, highest on the left in prepend mode). With
``time_interpretation: input`` each sample instead draws its noise level t ~ U(min_fraction,
max_fraction), is masked at t, and the rack's time embedding is told t. Masks and t depend on
(sample id, ratio, seed) only.

Optimizer groups: ``current_stack``, ``current_stack_lora`` (dual-LoRA, at ``qlora.lr``),
``head``, ``embeddings`` and ``time_embedding`` (stage 0), ``qlora_trunk`` (every trunk adapter,
at ``qlora.lr``). A step is one optimizer step over ``optimizer.grad_accumulation``
micro-batches, each micro-batch's mean loss weighted by its share of the step's target tokens
(so k micro-batches of B/k give the gradient of one batch of B). ``training.autocast`` runs
forward passes under bf16 autocast; ``training.seed`` seeds torch, ``random`` and numpy when a
fresh trainer first trains; ``training.max_steps`` (> 0) caps the steps of all stages together.

Checkpoints (with ``checkpoint_dir`` and ``training.checkpointing.enabled``): at each stage's end
and every ``checkpointing.every_steps`` global steps; :meth:`resume` or ``train_rack(...,
resume=True)`` continues from the newest one exactly: same batches, masks, RNG draws, optimizer
and LR state, so the losses and weights match a run that was never interrupted.

A batch is a LongTensor [B, S] of token ids or a dict with ``input_ids`` and optionally
``attention_mask`` (True = real token), ``labels`` and ``sample_id`` (see ``batches.py``).
"""

from __future__ import annotations

import functools
import math
import random
import time
from typing import Any

import torch
from torch import Tensor

from stackwise.exceptions import ConfigurationError, TrainingError
from stackwise.training.batches import (
    CachedSource,
    LoaderSource,
    check_loader,
    loader_generator,
)
from stackwise.training.consolidation import consolidate, set_trunk_recompute
from stackwise.training.distributed import DistributedTrainerMixin
from stackwise.training.growth import init_new_stack, stage_steps_share
from stackwise.training.loop import unit_record
from stackwise.training.optim import build_optimizer, clip_gradients, lr_lambda
from stackwise.training.rack_builder import ProgressiveRackBuilder
from stackwise.training.stage_steps import StageStepsMixin
from stackwise.training.strategies.caching import CacheManager


class ProgressiveTrainer(DistributedTrainerMixin, StageStepsMixin):
    """See the module docstring. ``config`` is a :class:`StackWiseConfig`. ``distributed``: a
    :class:`~stackwise.training.distributed.DistributedContext` (default: the active one, if a
    data-parallel job is running; see ``training/distributed.py``)."""

    def __init__(
        self,
        config,
        tokenizer_ids: dict[str, int] | None = None,
        checkpoint_dir: str | None = None,
        callbacks: list | None = None,
        distributed=None,
    ) -> None:
        self.config = config
        # Objects with any of on_stage_start(info), on_step(info), on_eval(info),
        # on_stage_end(record); each gets a plain dict (see _emit's callers for the keys).
        self.callbacks = list(callbacks or [])
        self.checkpoint_dir = checkpoint_dir
        self.training = config.training
        self.progressive = config.training.progressive
        if (
            self.progressive.time_interpretation == "input"
            and self.progressive.training_objective == "clm"
        ):
            raise ConfigurationError(
                "'input' masks each sample at its own noise level: use the 'diffusion' or "
                "'mlm' objective",
                "training.progressive.time_interpretation",
            )
        dev = self.training.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        self._attach_distributed(distributed)  # data parallel: rank's device, checks
        ids = tokenizer_ids or {}
        vocab = config.model.vocab_size
        self.mask_token_id = ids.get("mask", vocab - 1)
        self.pad_token_id = ids.get("pad")
        self.special_ids = tuple(v for k, v in ids.items() if v is not None)
        self.seed = self.training.seed
        self.history: list[dict[str, Any]] = []
        self.cache: CacheManager | None = None
        self._seeded = False  # training.seed applied (or RNG restored from a checkpoint)
        self._resume: dict[str, Any] | None = None  # set by checkpoint.load_checkpoint_into

    def _emit(self, event: str, info: dict[str, Any]) -> None:
        if self.dist is not None and not self.dist.is_main:
            return  # callbacks (logging) run on rank 0 only
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(info)

    @property
    def global_step(self) -> int:
        """Optimizer steps taken over all finished stages."""
        return sum(int(h.get("steps", 0)) for h in self.history)

    @property
    def input_time(self) -> bool:
        return self.progressive.time_interpretation == "input"

    def _seed_everything(self) -> None:
        torch.manual_seed(self.seed)  # CPU and every CUDA device
        random.seed(self.seed)
        try:
            import numpy as np
        except ImportError:
            return
        np.random.seed(self.seed % 2**32)

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
        dataloader = self._dist_loader(dataloader)  # this rank's share of each global batch
        if resume:
            from stackwise.training.checkpoint import has_checkpoint, load_checkpoint_into

            if self.checkpoint_dir is None:
                raise TrainingError("resume=True needs the trainer's checkpoint_dir")
            fresh = not self.history and self._resume is None
            if fresh and has_checkpoint(self.checkpoint_dir):
                load_checkpoint_into(self.checkpoint_dir, self, rack_builder)
        if not self._seeded:
            self._seed_everything()
            self._seeded = True
        if rack_builder.building_mode != self.progressive.building_mode:
            self.progressive.building_mode = rack_builder.building_mode
        rack = rack_builder.rack.to(self.device)
        cfg = self.training
        if self.cache is None:
            cm = cfg.caching
            self.cache = CacheManager(
                cache_mode="rack",
                max_cache_size=cm.max_cache_size,
                max_memory_mb=cm.max_memory_mb,
                storage_precision="as_is",
                spill_dir=self._dist_spill_dir(cm.spill_dir),
            )
        n_batches = self._count(dataloader)
        if n_batches == 0:
            raise TrainingError("the dataloader yielded no batches")
        # Mask ratios follow the planned depth (the configured target, or more), so a rack grown
        # over several calls gets the same schedule as one grown in one call.
        plan = max(target, self.progressive.target_stacks)
        resumed = self._resume
        self._resume = None
        stopped = None
        if resumed is not None:
            pending = resumed["in_progress"]
            if pending is not None:  # finish the stage the checkpoint was taken in
                stage, plan_then, steps = pending["stage"], pending["plan"], pending["steps"]
                args = (dataloader, stage, plan_then, eval_loader, steps, n_batches, resumed)
                self._run_stage(rack_builder, *args)
            else:
                gen = loader_generator(dataloader)
                if gen is not None and "loader.now" in resumed["extra_rng"]:
                    gen.set_state(resumed["extra_rng"]["loader.now"])
        while rack_builder.n_stacks < target:
            stage = rack_builder.n_stacks
            steps = self._stage_steps(n_batches, plan, stage)
            if steps <= 0:
                stopped = "max_steps"
                break
            rack_builder.add_stack(precision=self._trunk_precision())
            new_idx = rack_builder.n_stacks - 1 if rack_builder.building_mode == "append" else 0
            init_new_stack(rack_builder, new_idx, self.progressive.new_stack_init)
            rack.to(self.device)
            self._run_stage(rack_builder, dataloader, stage, plan, eval_loader, steps, n_batches)
        cons = self.progressive.consolidation_steps
        if cons and stopped is None and not any(h.get("phase") for h in self.history):
            args = (dataloader, eval_loader, cons, plan)
            self.history.append(consolidate(self, rack_builder, *args))
        return {
            "history": self.history,
            "final": self.history[-1] if self.history else {},
            "rack": rack,
            "stopped": stopped,
        }

    def _run_stage(self, builder, dataloader, *args) -> None:
        """Train one stage (``_train_stage``'s arguments), record it, write its checkpoint."""
        self.history.append(self._train_stage(builder, dataloader, *args))
        if self.checkpoint_dir is not None and self.training.checkpointing.enabled:
            gen_states = self._loader_states(dataloader)
            self._save_checkpoint(self.checkpoint_dir, self, builder, extra_rng=gen_states)

    @staticmethod
    def _loader_states(dataloader) -> dict[str, Tensor]:
        gen = loader_generator(dataloader)
        return {} if gen is None else {"loader.now": gen.get_state()}

    @classmethod
    def resume(cls, checkpoint_dir: str, config, **kwargs):
        """``(trainer, rack_builder)`` from the newest checkpoint in ``checkpoint_dir`` (at a
        stage's end or within a stage); ``trainer.train_rack(rack_builder, ...)`` with the same
        loaders continues exactly. ``kwargs`` go to the constructor (``tokenizer_ids``,
        ``callbacks``)."""
        from stackwise.training.checkpoint import load_stage_checkpoint

        return load_stage_checkpoint(checkpoint_dir, config, **kwargs)

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

    def _stage_groups(self, builder, stage: int, plan: int, new_idx: int):
        """Freeze what does not train at this stage and return the optimizer groups."""
        rack = builder.rack
        cfg, prog = self.training, self.progressive
        append = builder.building_mode == "append"
        qlora = prog.trunk_strategy == "qlora"
        for i in range(len(rack.stacks)):
            if i != new_idx:
                rank, alpha = builder.trunk_rank(i, plan, cfg.qlora)
                builder.freeze_stack(i, prog.trunk_strategy, cfg.qlora, rank=rank, alpha=alpha)
        new_stack = rack.stacks[new_idx]
        for p in new_stack.parameters():
            p.requires_grad_(True)
        lora = builder.stack_lora_parameters(new_idx)
        lora_ids = {id(p) for p in lora}
        first = stage == 0
        emb_params = list(rack.lexical.get_embeddings().parameters())
        if rack.position is not None:
            emb_params.append(rack.position.weight)
        for p in emb_params:
            p.requires_grad_(first and p is not None and not self._frozen_table(p, rack))
        time_params = [] if rack.time_embedding is None else list(rack.time_embedding.parameters())
        for p in time_params:
            p.requires_grad_(first)
        head_trains = append or first
        head_params = list(rack.final_norm.parameters())
        if not rack.lexical.tie_embeddings:
            head_params += list(rack.lexical.get_lm_head().parameters())
        for p in head_params:
            p.requires_grad_(head_trains)
        lr = cfg.learning_rate
        groups = [
            {
                "name": "current_stack",
                "params": [p for p in new_stack.parameters() if id(p) not in lora_ids],
                "lr": lr,
            }
        ]
        if lora:
            groups.append({"name": "current_stack_lora", "params": lora, "lr": cfg.qlora.lr})
        if head_trains:
            groups.append({"name": "head", "params": head_params, "lr": lr})
        if first:
            groups.append({"name": "embeddings", "params": emb_params, "lr": lr})
            if time_params:
                groups.append({"name": "time_embedding", "params": time_params, "lr": lr})
        if qlora and not first:
            trunk = builder.trunk_adapter_parameters(exclude=new_idx)
            for p in trunk:
                p.requires_grad_(True)
            groups.append({"name": "qlora_trunk", "params": trunk, "lr": cfg.qlora.lr})
        return groups

    def _train_stage(
        self, builder, dataloader, stage, target, eval_loader, steps, n_batches, resumed=None
    ) -> dict:
        rack = builder.rack
        cfg, prog = self.training, self.progressive
        append = builder.building_mode == "append"
        new_idx = len(rack.stacks) - 1 if append else 0
        qlora = prog.trunk_strategy == "qlora"
        first = stage == 0
        groups = self._stage_groups(builder, stage, target, new_idx)
        set_trunk_recompute(rack, {new_idx}, prog.trunk_checkpointing)
        groups = self._wrap_stage(rack, groups)  # DDP / FSDP in a data-parallel run
        ratio = self.stage_ratio(stage, target)
        accum = cfg.optimizer.grad_accumulation
        pending = resumed["in_progress"] if resumed is not None else None
        saved = resumed["extra_rng"] if resumed is not None else {}
        start = pending["step"] if pending is not None else 0

        # Which boundary the stage reads: append -> the trunk's output (its input with a qlora
        # trunk, whose adapters train); prepend -> the embeddings. Stage 0 reads raw ids, since
        # the embeddings train with it.
        use_cache = prog.cache_activations and not first
        cache_block = 0 if (qlora or not append) else new_idx
        t0 = time.perf_counter()
        gen_start = loader_generator(dataloader)
        if pending is not None and gen_start is not None and "loader.stage_start" in saved:
            gen_start.set_state(saved["loader.stage_start"])
        stage_start_state = gen_start.get_state() if gen_start is not None else None
        # Only as many batches as the stage will use are cached (a stage of S steps reads
        # S x grad_accumulation batches, cycling when the loader has fewer).
        if use_cache:
            ids = self._fill_cache(
                rack, dataloader, ratio, cache_block, limit=min(steps * accum, n_batches)
            )
            source = CachedSource(
                ids,
                start=start * accum,
                prefetch=functools.partial(self.cache.prefetch, cache_block),
                depth=cfg.caching.prefetch,
            )
        else:
            position = None
            if pending is not None:
                states = {k.split(".", 1)[1]: v for k, v in saved.items()}
                position = (pending["data"], states)
            source = LoaderSource(dataloader, n_batches, resume=position)
        cache_time = time.perf_counter() - t0 if pending is None else pending["cache_fill_s"]
        opt = build_optimizer(groups, cfg.optimizer)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optimizer, steps))
        if pending is not None:
            opt.load_state_dict(pending["optimizer"])
            sched.load_state_dict(pending["scheduler"])
            self._load_sharded_optimizer(opt, resumed)  # fsdp: this rank's optimizer shard
            from stackwise.training.checkpoint import restore_rng_state

            # Last, after the cache refill and the loader replay, which may draw from it.
            restore_rng_state(resumed["rng"], resumed["rng_meta"])
        trainable = [p for g in opt.param_groups for p in g["params"]]
        base_step = self.global_step
        record_ratio = ratio if prog.training_objective != "clm" else 0.0
        stage_info = {
            "stage": stage,
            "stack_index": new_idx,
            "n_stacks": len(rack.stacks),
            "target_stacks": target,
            "steps": steps,
            "mask_ratio": record_ratio,
            "param_groups": [g["name"] for g in opt.param_groups],
            "group_lr": {g["name"]: g["initial_lr"] for g in opt.param_groups},
            "cache_fill_s": cache_time,
            "start_step": start,
        }
        self._emit("on_stage_start", stage_info)
        eval_every = cfg.eval_every if eval_loader is not None else 0
        every = cfg.checkpointing.every_steps
        checkpointing = self.checkpoint_dir is not None and cfg.checkpointing.enabled and every > 0
        rack.train()
        losses: list[float] = list(pending["losses"]) if pending else []
        step_times: list[float] = [t / 1e3 for t in pending["step_ms"]] if pending else []
        tokens = int(pending["tokens"]) if pending else 0
        wall_before = float(pending["wall_s"]) if pending else 0.0
        t_start = time.perf_counter()
        step = start
        while step < steps:
            t_step = time.perf_counter()
            micro = [
                self._prepare(rack, source.next(), ratio, use_cache, cache_block)
                for _ in range(accum)
            ]
            # Data parallel: weights are shares of the global step's tokens, the loss global.
            n_total = int(self._global_sum(sum(m["n_tok"] for m in micro)))
            step_loss = 0.0
            for i, m in enumerate(micro):
                weight = m["n_tok"] / n_total if n_total else 1.0 / accum
                with self._no_sync(i < len(micro) - 1):
                    with self._autocast():
                        loss = self._forward_loss(rack, m)
                    value = loss.item()
                    if not math.isfinite(value):
                        raise TrainingError(
                            f"loss is {value} at stage {stage} (stack {new_idx}), step {step}"
                        )
                    (loss * (weight * self._loss_scale)).backward()
                step_loss += value * weight
            step_loss = self._global_sum(step_loss)
            clip_gradients(trainable, cfg.optimizer.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
            step_times.append(time.perf_counter() - t_step)
            tokens += n_total
            step += 1
            elapsed = wall_before + time.perf_counter() - t_start
            if checkpointing and (base_step + step) % every == 0 and step < steps:
                progress = {
                    "stage": stage,
                    "step": step,
                    "steps": steps,
                    "plan": target,
                    "losses": losses,
                    "step_ms": [1e3 * t for t in step_times],
                    "tokens": tokens,
                    "wall_s": elapsed,
                    "cache_fill_s": cache_time,
                    "data": source.position() if isinstance(source, LoaderSource) else None,
                }
                extra = {}
                if stage_start_state is not None:
                    extra["loader.stage_start"] = stage_start_state
                if isinstance(source, LoaderSource):
                    extra.update({f"loader.{k}": v for k, v in source.generator_states().items()})
                self._save_checkpoint(
                    self.checkpoint_dir, self, builder, progress, opt, sched, extra
                )
            if self.callbacks:
                self._emit(
                    "on_step",
                    {
                        "stage": stage,
                        "stack_index": new_idx,
                        "step": step,
                        "steps": steps,
                        "global_step": base_step + step,
                        "loss": losses[-1],
                        "lr": opt.param_groups[0]["lr"],
                        "tokens": tokens,
                        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                        "step_ms": 1e3 * step_times[-1],
                    },
                )
            if eval_every and step % eval_every == 0 and step < steps:
                eval_loss = self.evaluate(rack, eval_loader, ratio)
                rack.train()
                self._emit(
                    "on_eval",
                    {
                        "stage": stage,
                        "step": step,
                        "global_step": base_step + step,
                        "eval_loss": eval_loss,
                    },
                )
        wall = wall_before + time.perf_counter() - t_start
        self._unwrap_stage()
        record = {
            "stage": stage,
            "stack_index": new_idx,
            "n_stacks": len(rack.stacks),
            "mask_ratio": record_ratio,
            **unit_record(
                losses=losses,
                step_times=step_times,
                steps=steps,
                tokens=tokens,
                wall=wall,
                cache_fill_s=cache_time,
                device=self.device,
                cache=self.cache.memory_stats() if use_cache else None,
                param_groups=[g["name"] for g in opt.param_groups],
            ),
        }
        if eval_loader is not None:
            record["eval_loss"] = self.evaluate(rack, eval_loader, ratio)
            self._emit(
                "on_eval",
                {
                    "stage": stage,
                    "step": steps,
                    "global_step": base_step + steps,
                    "eval_loss": record["eval_loss"],
                },
            )
        self._emit("on_stage_end", record)
        return record

    @staticmethod
    def _frozen_table(p, rack) -> bool:
        table = rack.lexical.get_embeddings().table.weight
        return (
            p is table
            and not table.requires_grad
            and rack.lexical.embedding_option == "embed_tokens"
        )

    @staticmethod
    def _count(dataloader) -> int:
        try:
            return len(dataloader)
        except TypeError:
            return sum(1 for _ in dataloader)
