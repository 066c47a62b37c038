"""``SegmentTrainer``: what the hierarchical :class:`~stackwise.training.trainer.Trainer` and the
:class:`~stackwise.training.core.fusion_trainer.FusionTrainer` share. A model is seen as a list of
modules (its blocks, or groups of them); :meth:`SegmentTrainer.train_segment` trains
``modules[start:end]`` on top of the frozen modules before it, with the shared final norm and LM
head, through the one :class:`~stackwise.training.loop.TrainLoop`: the frozen prefix is read
from the activation cache when nothing in it trains (embeddings included), else recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stackwise.exceptions import TrainingError
from stackwise.training.batches import check_loader
from stackwise.training.loop import TrainLoop, Unit, call_callbacks, count_batches, stage_cache
from stackwise.training.parallel import DataParallel
from stackwise.training.step import BatchStep, resolve_device
from stackwise.training.strategies.caching import CacheManager
from stackwise.training.strategies.masking import MaskScheduler


class SegmentTrainer:
    """What the hierarchical and the fusion trainers share: a model seen as its flat list of
    blocks, one :class:`~stackwise.training.loop.TrainLoop` (one process), and
    :meth:`train_segment`, which trains ``blocks[start:end]`` (and whatever else the groups
    hold) on top of the frozen blocks before it, with the shared final norm and LM head.

    Args:
        config: a :class:`~stackwise.config.base.StackWiseConfig`.
        tokenizer_ids: ``{"mask": id, "pad": id, ...}``; the mask id defaults to vocab_size - 1.
        callbacks: objects with any of ``on_unit_start(info)``, ``on_step(info)``,
            ``on_eval(info)``, ``on_unit_end(record)``.
    """

    def __init__(self, config, tokenizer_ids: dict[str, int] | None = None, callbacks=None) -> None:
        self.config = config
        self.training = config.training
        self.device = resolve_device(self.training.device)
        self.seed = self.training.seed
        self.callbacks = list(callbacks or [])
        self.history: list[dict[str, Any]] = []
        self.step = BatchStep(config, self.device, tokenizer_ids)
        self.loop = TrainLoop(config, self.step, DataParallel(None), self._new_cache, self._emit)

    @property
    def cache(self) -> CacheManager | None:
        return self.loop.cache

    def _emit(self, event: str, info: dict[str, Any]) -> None:
        call_callbacks(self.callbacks, event, info)

    def _new_cache(self) -> CacheManager:
        return stage_cache(self.training.caching)

    def unit_ratio(self, end: int, n_units: int) -> float:
        """Mask ratio of a unit ending at unit ``end`` (exclusive) of ``n_units``: the
        ``training.masking`` schedule there (``max_fraction`` everywhere when
        ``training.time_step_masking`` is false); 0 for clm."""
        if self.step.objective == "clm":
            return 0.0
        m = self.training.masking
        if not self.training.time_step_masking:
            return m.max_fraction
        sched = MaskScheduler(m.min_fraction, m.max_fraction, m.schedule)
        return sched.get_mask_fraction(end - 1, n_units)

    def train_segment(
        self,
        model: nn.Module,
        modules: Sequence[nn.Module],
        start: int,
        end: int,
        dataloader,
        groups: list[dict] | torch.optim.Optimizer,
        steps: int | None,
        *,
        label: str,
        ratio: float = 0.0,
        cache_prefix: bool = True,
        info: dict[str, Any] | None = None,
        eval_loader=None,
    ) -> dict[str, Any]:
        """Train ``modules[start:end]`` (a list of the model's blocks, or groups of them) and
        whatever else ``groups`` holds for ``steps`` optimizer steps (default:
        ``training.max_steps``, or one pass over the loader when that is 0). The prefix
        ``modules[:start]`` is read from the activation cache when nothing in it (embeddings
        included) trains and ``cache_prefix``; else it runs every step. ``label`` names the unit
        in errors; ``eval_loader``: evaluate the whole model on it every
        ``training.eval_every`` steps and at the end. Returns the record appended to
        :attr:`history`."""
        has_time = getattr(model, "time_embedding", None) is not None
        if has_time != self.step.input_time:
            raise TrainingError(
                f"{label}: the rack is time-conditioned (it has a time embedding) but "
                "training.progressive.time_interpretation is not 'input'"
                if has_time
                else f"{label}: training.progressive.time_interpretation is 'input' but the "
                "rack has no time embedding to tell t"
            )
        if not 0 <= start < end <= len(modules):
            raise TrainingError(f"{label}: segment [{start}, {end}) is outside 0..{len(modules)}")
        check_loader(dataloader)
        n_batches = count_batches(dataloader)
        if n_batches == 0:
            raise TrainingError(f"{label}: the dataloader yielded no batches")
        accum = self.training.optimizer.grad_accumulation
        if steps is None:
            steps = self.training.max_steps or max(1, n_batches // accum)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise TrainingError(f"{label}: steps must be an integer >= 1, got {steps!r}")
        if isinstance(groups, torch.optim.Optimizer):
            trainable = {id(p) for g in groups.param_groups for p in g["params"]}
        else:
            trainable = {id(p) for g in groups for p in g["params"] if p.requires_grad}
        prefix = list(model.lexical.get_embeddings().parameters())
        if getattr(model, "position", None) is not None:
            prefix.append(model.position.weight)
        if has_time:
            prefix += list(model.time_embedding.parameters())
        for m in modules[:start]:
            prefix += list(m.parameters())
        frozen_prefix = not any(id(p) in trainable for p in prefix)
        fixed = list(modules)
        unit = Unit(
            label=label,
            model=model,
            modules_of=lambda _model: fixed,
            start=start,
            end=end,
            groups=groups,
            steps=steps,
            ratio=ratio,
            cached=cache_prefix and start > 0 and frozen_prefix,
            identity={"label": label, **(info or {})},
        )
        record = self.loop.run(unit, dataloader, n_batches, eval_loader=eval_loader)
        self.history.append(record)
        return record


__all__ = ["SegmentTrainer"]
