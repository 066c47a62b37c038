"""The training loop, once for every trainer: :meth:`TrainLoop.run` trains one :class:`Unit`.

A unit is what a trainer trains at once: a progressive stage (one stack over a frozen trunk), a
block or a stack of the hierarchical trainer, a fusion block. The trainer decides *what* trains
(it freezes the rest and names the optimizer groups); the loop does the rest, like nanoGPT's
``train.py``::

    fill the cache (the frozen prefix's output, once per batch) or read the loader
    for step in range(steps):
        for each of grad_accumulation micro-batches: loss = step.loss(...); backward
        clip; optimizer step; scheduler step; log; evaluate; checkpoint
    evaluate; record

- **Accumulation**: one step is one optimizer step over ``training.optimizer.grad_accumulation``
  micro-batches, each micro-batch's mean loss weighted by its share of the step's target tokens
  (all ranks' tokens in a data-parallel run), so k micro-batches of B/k give the gradient of one
  batch of B, padding or not. A micro-batch with no target token contributes nothing; a step
  with none at all raises :class:`TrainingError` (it would train on a zero loss).
- **Schedule**: linear warmup, then cosine / linear / constant decay
  (:func:`~stackwise.training.optim.lr_lambda`); the logged ``lr`` is the one the step used.
- **Precision**: fp16 autocast scales the loss (``torch.amp.GradScaler``); bf16 needs no scaling.
- **Events**: ``callbacks`` get ``<start_event>(info)``, ``on_step(info)`` every step,
  ``on_eval(info)`` and ``<end_event>(record)`` (rank 0 only); ``info`` holds the unit's identity
  fields (``Unit.identity``) and, per step, ``step``, ``steps``, ``global_step``, ``loss``,
  ``lr``, ``tokens``, ``tokens_per_s``, ``step_ms``.
- **Checkpoints** (``checkpoint`` callable, ``training.checkpointing.every_steps``): a
  :class:`~stackwise.training.checkpoint.StageProgress` with the data position and generator
  states; :meth:`TrainLoop.run` with ``resume`` continues from one exactly (same batches, masks,
  RNG draws, optimizer and LR state).
"""

from __future__ import annotations

import functools
import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from stackwise.exceptions import ModelError, TrainingError
from stackwise.training.batches import CachedSource, LoaderSource, loader_generator
from stackwise.training.checkpoint import ResumeState, StageProgress, restore_rng_state
from stackwise.training.optim import (
    build_optimizer,
    clip_gradients,
    effective_warmup,
    lr_lambda,
)
from stackwise.training.parallel import DataParallel
from stackwise.training.step import BatchStep, MicroBatch
from stackwise.training.strategies.caching import CacheManager


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory on CUDA; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def count_batches(dataloader) -> int:
    try:
        return len(dataloader)
    except TypeError:
        return sum(1 for _ in dataloader)


def flat_blocks(rack) -> list[nn.Module]:
    """The rack's blocks in order, over all stacks."""
    if not hasattr(rack, "stacks"):
        raise ModelError(f"expected a Rack, got {type(rack).__name__}")
    return [b for s in rack.stacks for b in s.blocks]


def stage_cache(caching, spill_dir=None) -> CacheManager:
    """The activation cache of ``training.caching`` in the cache's "rack" mode: storing a new
    boundary releases the previous one, since a unit reads only its own. ``spill_dir``
    overrides ``caching.spill_dir`` (a data-parallel rank's own folder)."""
    return CacheManager(
        cache_mode="rack",
        max_cache_size=caching.max_cache_size,
        max_memory_mb=caching.max_memory_mb,
        storage_precision=caching.storage_precision,
        spill_dir=caching.spill_dir if spill_dir is None else spill_dir,
    )


def call_callbacks(callbacks, event: str, info: dict[str, Any]) -> None:
    """``callback.<event>(info)`` for each callback that has that method."""
    for cb in callbacks:
        fn = getattr(cb, event, None)
        if fn is not None:
            fn(info)


def rack_stacks(rack) -> list[nn.Module]:
    """The rack's stacks in order (the modules of progressive training)."""
    return list(rack.stacks)


@dataclass
class Unit:
    """One trained unit (module docstring).

    ``modules_of(model)`` lists the model's modules (stacks or blocks); ``start`` is the first
    module that runs with gradients (``cached``: boundary ``start`` is read from the cache) and
    ``end`` the module after the last one that runs. ``groups`` are named optimizer groups
    (:func:`build_optimizer`) or an optimizer whose groups carry a ``name``. ``identity``: the
    fields that name the unit in events and in its record; ``index`` and ``plan`` name it in a
    checkpoint. ``ratio``: the mask ratio of the objective.
    """

    label: str
    model: nn.Module
    modules_of: Callable[[nn.Module], Sequence[nn.Module]]
    start: int
    end: int
    groups: list[dict] | torch.optim.Optimizer
    steps: int
    ratio: float | tuple[float, float] = 0.0
    cached: bool = False
    identity: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    plan: int = 1
    start_event: str = "on_unit_start"
    end_event: str = "on_unit_end"


class TrainLoop:
    """Runs units (module docstring). ``step``: the :class:`BatchStep`; ``parallel``: the
    :class:`DataParallel` (a no-op in one process); ``cache``: the activation cache, created on
    first use by ``make_cache()``; ``emit(event, info)``: the trainer's callback dispatch."""

    def __init__(
        self,
        config,
        step: BatchStep,
        parallel: DataParallel,
        make_cache: Callable[[], CacheManager],
        emit: Callable[[str, dict], None],
    ) -> None:
        self.config = config
        self.training = config.training
        self.step = step
        self.parallel = parallel
        self._make_cache = make_cache
        self.cache: CacheManager | None = None
        self.emit = emit

    # -- pieces ---------------------------------------------------------------------------------

    def _loss_fn(self, unit: Unit):
        """``(model, micro-batch) -> loss`` of the unit. A micro-batch without targets (which
        only a data-parallel rank runs) gives a zero that still runs the whole forward pass, so
        every trainable parameter takes part in the gradient collective."""

        def loss(model: nn.Module, m: MicroBatch) -> Tensor:
            modules = unit.modules_of(model)
            if m.n_tok:
                return self.step.loss(model, modules, m, unit.end)
            with self.step.autocast():  # every label ignored: loss 0, zero gradients
                return model.token_loss(self.step.hidden(model, modules, m, unit.end), m.labels)

        return loss

    @staticmethod
    def _train_mode(unit: Unit) -> None:
        """Train mode, except for modules with nothing to train: a frozen module is a fixed
        function (no dropout), whether its output is cached or recomputed every step."""
        unit.model.train()
        for m in unit.modules_of(unit.model):
            if not any(p.requires_grad for p in m.parameters()):
                m.eval()

    def evaluate(self, unit: Unit, eval_loader, max_batches: int = 50) -> float:
        self.parallel.sync_weights()
        modules = unit.modules_of(unit.model)
        cap = self.training.eval_max_tokens
        return self.step.evaluate(unit.model, modules, eval_loader, unit.ratio, max_batches, cap)

    def _source(self, unit, dataloader, n_batches, accum, start, progress, saved):
        """The stage's micro-batches: cached batch ids (the cache filled here) or the loader."""
        if unit.cached:
            if self.cache is None:
                self.cache = self._make_cache()
            ids = self.step.fill_cache(
                self.cache,
                unit.model,
                unit.modules_of(unit.model),
                unit.start,
                dataloader,
                unit.ratio,
                limit=min(unit.steps * accum, n_batches),
            )
            return CachedSource(
                ids,
                start=start * accum,
                prefetch=functools.partial(self.cache.prefetch, unit.start),
                depth=self.training.caching.prefetch,
            )
        position = None
        if progress is not None:
            states = {k.split(".", 1)[1]: v for k, v in saved.items()}
            position = (progress.data, states)
        return LoaderSource(dataloader, n_batches, resume=position)

    def _micro(self, unit: Unit, source) -> MicroBatch:
        if unit.cached:
            return self.step.cached_micro_batch(self.cache, unit.start, source.next())
        return self.step.micro_batch(source.next(), unit.ratio)

    # -- the loop -------------------------------------------------------------------------------

    def run(
        self,
        unit: Unit,
        dataloader,
        n_batches: int,
        *,
        eval_loader=None,
        checkpoint: Callable[..., Any] | None = None,
        resume: ResumeState | None = None,
        base_step: int = 0,
        checkpoint_dir=None,
    ) -> dict[str, Any]:
        """Train ``unit`` for ``unit.steps`` optimizer steps; returns its record. ``checkpoint``
        (progress, optimizer, scheduler, extra_rng) writes a mid-stage checkpoint;
        ``resume``: continue the unit from the checkpoint's progress; ``base_step``: global
        steps before this unit; ``checkpoint_dir``: where a data-parallel resume finds the
        sharded optimizer state."""
        cfg = self.training
        accum = cfg.optimizer.grad_accumulation
        progress = resume.progress if resume is not None else None
        saved = resume.extra_rng if resume is not None else {}
        start = progress.step if progress is not None else 0
        steps = unit.steps

        if isinstance(unit.groups, torch.optim.Optimizer):
            opt = unit.groups
        else:
            groups = self.parallel.wrap(unit.model, unit.groups, self._loss_fn(unit))
            opt = build_optimizer(groups, cfg.optimizer)
        t0 = time.perf_counter()
        gen = loader_generator(dataloader)
        if progress is not None and gen is not None and "loader.stage_start" in saved:
            gen.set_state(saved["loader.stage_start"])
        stage_start_state = gen.get_state() if gen is not None else None
        source = self._source(unit, dataloader, n_batches, accum, start, progress, saved)
        cache_time = time.perf_counter() - t0 if progress is None else progress.cache_fill_s
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optimizer, steps))
        scaler = self._grad_scaler()
        if progress is not None:
            opt.load_state_dict(progress.optimizer)
            sched.load_state_dict(progress.scheduler)
            self.parallel.load_optimizer(opt, checkpoint_dir, resume.folder)
            # Last, after the cache refill and the loader replay, which may draw from it.
            restore_rng_state(resume.rng, resume.rng_meta)
        trainable = [p for g in opt.param_groups for p in g["params"]]
        names = [g.get("name", f"group{i}") for i, g in enumerate(opt.param_groups)]
        self.emit(
            unit.start_event,
            {
                **unit.identity,
                "steps": steps,
                "param_groups": names,
                "group_lr": {
                    n: g.get("initial_lr", g["lr"])
                    for n, g in zip(names, opt.param_groups, strict=True)
                },
                "cache_fill_s": cache_time,
                "start_step": start,
                "warmup_steps": effective_warmup(cfg.optimizer.warmup_steps, steps),
                "warmup_steps_configured": cfg.optimizer.warmup_steps,
            },
        )
        eval_every = cfg.eval_every if eval_loader is not None else 0
        every = cfg.checkpointing.every_steps if checkpoint is not None else 0
        self._train_mode(unit)
        losses = list(progress.losses) if progress else []
        step_times = [t / 1e3 for t in progress.step_ms] if progress else []
        tokens = int(progress.tokens) if progress else 0
        wall_before = float(progress.wall_s) if progress else 0.0
        t_start = time.perf_counter()
        loss_fn = self._loss_fn(unit)
        step = start
        while step < steps:
            t_step = time.perf_counter()
            micro = [self._micro(unit, source) for _ in range(accum)]
            n_tok = [m.n_tok for m in micro]
            n_total = int(self.parallel.global_sum(sum(n_tok)))
            if n_total == 0:
                raise TrainingError(
                    f"{unit.label}, step {step}: no micro-batch of the step has a target token "
                    "(nothing to predict: check the labels, or the mask ratio)"
                )
            step_loss = 0.0
            for i, m in enumerate(micro):
                if n_tok[i] == 0 and not self.parallel.enabled:
                    continue  # nothing to learn from; a data-parallel rank still joins the sync
                weight = n_tok[i] / n_total
                with self.parallel.no_sync(i < len(micro) - 1):
                    loss = self.parallel.loss(unit.model, m, loss_fn)
                    value = loss.item()
                    if not math.isfinite(value):
                        raise TrainingError(
                            f"loss is {value} at step {step} while training {unit.label}"
                        )
                    scaled = loss * (weight * self.parallel.loss_scale)
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                step_loss += value * weight
            step_loss = self.parallel.global_sum(step_loss)
            if scaler is not None:
                scaler.unscale_(opt)
            clip_gradients(trainable, cfg.optimizer.grad_clip)
            lr = opt.param_groups[0]["lr"]  # the rate this step uses
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
            step_times.append(time.perf_counter() - t_step)
            tokens += n_total
            step += 1
            elapsed = wall_before + time.perf_counter() - t_start
            if every and (base_step + step) % every == 0 and step < steps:
                extra = {}
                if stage_start_state is not None:
                    extra["loader.stage_start"] = stage_start_state
                if isinstance(source, LoaderSource):
                    extra.update({f"loader.{k}": v for k, v in source.generator_states().items()})
                checkpoint(
                    StageProgress(
                        stage=unit.index,
                        step=step,
                        steps=steps,
                        plan=unit.plan,
                        losses=losses,
                        step_ms=[1e3 * t for t in step_times],
                        tokens=tokens,
                        wall_s=elapsed,
                        cache_fill_s=cache_time,
                        data=source.position() if isinstance(source, LoaderSource) else None,
                    ),
                    opt,
                    sched,
                    extra,
                )
            self.emit(
                "on_step",
                {
                    **unit.identity,
                    "step": step,
                    "steps": steps,
                    "global_step": base_step + step,
                    "loss": losses[-1],
                    "lr": lr,
                    "tokens": tokens,
                    "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                    "step_ms": 1e3 * step_times[-1],
                },
            )
            if eval_every and step % eval_every == 0 and step < steps:
                eval_loss = self.evaluate(unit, eval_loader)
                self._train_mode(unit)
                self.emit(
                    "on_eval",
                    {
                        **unit.identity,
                        "step": step,
                        "global_step": base_step + step,
                        "eval_loss": eval_loss,
                    },
                )
        wall = wall_before + time.perf_counter() - t_start
        self.parallel.unwrap()
        record = {
            **unit.identity,
            "cached_prefix": unit.cached,
            "losses": losses,
            "step_ms": [1e3 * t for t in step_times],
            "steps": steps,
            "tokens": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "wall_s": wall,
            "cache_fill_s": cache_time,
            "peak_memory_bytes": peak_memory_bytes(self.step.device),
            "cache": self.cache.memory_stats() if unit.cached else None,
            "param_groups": names,
        }
        if eval_loader is not None:
            record["eval_loss"] = self.evaluate(unit, eval_loader)
            self.emit(
                "on_eval",
                {
                    **unit.identity,
                    "step": steps,
                    "global_step": base_step + steps,
                    "eval_loss": record["eval_loss"],
                },
            )
        self.emit(unit.end_event, record)
        return record

    def _grad_scaler(self):
        if self.step.dtype is not torch.float16:
            return None
        return torch.amp.GradScaler(self.step.device.type)


__all__ = [
    "TrainLoop",
    "Unit",
    "count_batches",
    "flat_blocks",
    "peak_memory_bytes",
    "call_callbacks",
    "rack_stacks",
    "stage_cache",
]
