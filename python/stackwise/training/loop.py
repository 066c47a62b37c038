"""The training loop shared by the hierarchical :class:`~stackwise.training.trainer.Trainer` and
the :class:`~stackwise.training.core.fusion_trainer.FusionTrainer`: train one *segment* of a
model's module list on top of a frozen prefix, with the shared final norm and LM head.

A model is seen as ``embed(ids) -> modules[0] -> ... -> modules[n-1] -> logits(h)``, each module
taking ``(h [B, S, D], key_padding_mask [B, S] | None)``. Training the segment
``modules[start:end]`` reads the activation entering ``modules[start]``:

- **cached** (the prefix is frozen): computed once per batch under ``no_grad`` and stored in the
  :class:`CacheManager` under the index of the module it leaves (``start - 1``, the cache's
  convention), with the labels and attention mask as companions; every step reads it back, so
  the prefix is never recomputed;
- **recomputed** (``start == 0``, caching off, or prefix parameters that train, such as LoRA
  adapters of a quantized backbone): the prefix runs every step, gradients flowing only into
  what requires them.

Batches: a LongTensor [B, S] of token ids or a dict with ``input_ids`` and optionally
``attention_mask`` (True = real token), ``labels`` and ``sample_id``. Objectives follow
``training.progressive.training_objective`` (clm / mlm / diffusion), as in
:class:`~stackwise.training.progressive.ProgressiveTrainer`.

One step is one optimizer step over ``training.optimizer.grad_accumulation`` batches, weighted
by their loss tokens, so 2 batches of B/2 with accumulation 2 make the same update as one batch
of B, padding or not. ``losses`` in a record are per optimizer step (the mean over its tokens).
"""

from __future__ import annotations

import contextlib
import functools
import math
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from stackwise.exceptions import ModelError, TrainingError
from stackwise.training.batches import CachedSource, check_loader, parse_batch
from stackwise.training.optim import build_optimizer, clip_gradients, lr_lambda
from stackwise.training.strategies.caching import CacheManager
from stackwise.training.strategies.masking import corrupt_batch, token_loss


def resolve_device(name: str) -> torch.device:
    """``training.device``: "auto" picks CUDA when available."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory on CUDA; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def unit_record(
    *,
    losses: list[float],
    step_times: list[float],
    steps: int,
    tokens: int,
    wall: float,
    cache_fill_s: float,
    device: torch.device,
    cache: dict[str, Any] | None,
    param_groups: list[str],
) -> dict[str, Any]:
    """The measurements every trainer records for a trained unit (a stage, a block, a stack):
    per-step losses and times, tokens and their rate, wall and cache-fill seconds, peak memory,
    the cache's statistics (None when the unit read no cache) and the optimizer's groups."""
    return {
        "losses": losses,
        "step_ms": [1e3 * t for t in step_times],
        "steps": steps,
        "tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "wall_s": wall,
        "cache_fill_s": cache_fill_s,
        "peak_memory_bytes": peak_memory_bytes(device),
        "cache": cache,
        "param_groups": param_groups,
    }


def count_batches(dataloader) -> int:
    try:
        return len(dataloader)
    except TypeError:
        return sum(1 for _ in dataloader)


class SegmentTrainer:
    """Batch parsing, objectives, the activation cache and the optimizer loop; subclasses decide
    which segments train and which parameter groups they optimize.

    Args:
        config: a :class:`~stackwise.config.base.StackWiseConfig`.
        tokenizer_ids: ``{"mask": id, "pad": id, ...}``; the mask id defaults to vocab_size - 1.
        callbacks: objects with any of ``on_unit_start(info)``, ``on_step(info)``,
            ``on_unit_end(record)``.
    """

    cache_mode = "layerwise"

    def __init__(self, config, tokenizer_ids: dict[str, int] | None = None, callbacks=None) -> None:
        self.config = config
        self.training = config.training
        self.device = resolve_device(self.training.device)
        ids = tokenizer_ids or {}
        self.mask_token_id = ids.get("mask", config.model.vocab_size - 1)
        self.special_ids = tuple(v for v in ids.values() if v is not None)
        self.seed = self.training.seed
        self.callbacks = list(callbacks or [])
        self.history: list[dict[str, Any]] = []
        self.cache: CacheManager | None = None

    def _emit(self, event: str, info: dict[str, Any]) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(info)

    # -- batches --------------------------------------------------------------------------------

    def parse_batch(self, batch, batch_idx: int) -> dict[str, Tensor | None]:
        """Check one batch (:func:`stackwise.training.batches.parse_batch`) and return
        ``input_ids``, ``attention_mask``, ``labels``, ``sample_id``; a malformed batch raises
        :class:`TrainingError` saying what was wrong."""
        m = self.config.model
        return parse_batch(batch, batch_idx, m.vocab_size, m.max_seq_len)

    def corrupt(self, parsed: dict[str, Tensor | None], ratio: float) -> tuple[Tensor, Tensor]:
        """``(model inputs, labels)`` for the configured objective at mask ratio ``ratio``."""
        return corrupt_batch(
            parsed,
            ratio,
            self.training.progressive.training_objective,
            seed=self.seed,
            mask_token_id=self.mask_token_id,
            special_ids=self.special_ids,
            vocab_size=self.config.model.vocab_size,
            masking=self.training.masking,
        )

    def _autocast(self):
        if not self.training.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # -- the loop -------------------------------------------------------------------------------

    def _new_cache(self) -> CacheManager:
        if self.cache is None:
            cm = self.training.caching
            self.cache = CacheManager(
                cache_mode=self.cache_mode,
                max_cache_size=cm.max_cache_size,
                max_memory_mb=cm.max_memory_mb,
                storage_precision="as_is",  # exact: cached and recomputed prefixes agree
                spill_dir=cm.spill_dir,
            )
        self.cache.clear()
        return self.cache

    @staticmethod
    def _run(modules: Sequence[nn.Module], h: Tensor, start: int, end: int, mask) -> Tensor:
        for m in modules[start:end]:
            h = m(h, mask)
        return h

    def _fill_cache(self, model, modules, start, dataloader, ratio, limit) -> list[int]:
        cache = self._new_cache()
        ids: list[int] = []
        with torch.no_grad(), self._autocast():
            for batch_idx, batch in enumerate(dataloader):
                if batch_idx >= limit:
                    break
                parsed = self.parse_batch(batch, batch_idx)
                inputs, labels = self.corrupt(parsed, ratio)
                mask = parsed["attention_mask"]
                dmask = None if mask is None else mask.to(self.device)
                h = self._run(modules, model.embed(inputs.to(self.device)), 0, start, dmask)
                attn = mask if mask is not None else torch.ones_like(labels, dtype=torch.bool)
                companions = torch.stack([labels.cpu(), attn.long().cpu()])
                ids.append(cache.store_activations(start - 1, h.detach().cpu(), companions))
        return ids

    def _batch_loss(self, model, modules, start, end, item, ratio, cached) -> tuple[Tensor, int]:
        dev = self.device
        if cached:
            h, comp = self.cache.get_batch(start - 1, item, release=True)
            h = h.to(dev)
            labels, attn = comp[0].to(dev), comp[1].bool().to(dev)
            mask = None if bool(attn.all()) else attn
            begin = start
        else:
            batch_idx, batch = item
            parsed = self.parse_batch(batch, batch_idx)
            inputs, labels = self.corrupt(parsed, ratio)
            mask = parsed["attention_mask"]
            mask = None if mask is None else mask.to(dev)
            labels = labels.to(dev)
            h = model.embed(inputs.to(dev))
            begin = 0
        with self._autocast():
            h = self._run(modules, h, begin, end, mask)
            logits = model.logits(h)
        return token_loss(logits, labels), int((labels != -100).sum())

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
        after_step: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Train ``modules[start:end]`` (and whatever else ``groups`` holds) for ``steps``
        optimizer steps (default: ``training.max_steps``, or one pass over the loader when that
        is 0). ``groups``: named parameter groups for :func:`build_optimizer`, or an optimizer
        whose groups carry a ``name``. ``label`` ("block 3", "stack 1", ...) names the unit in
        errors. Returns the record appended to :attr:`history`."""
        cfg = self.training
        if getattr(model, "time_embedding", None) is not None:
            raise TrainingError(
                f"{label}: the rack is time-conditioned (time_interpretation 'input'); this "
                "trainer feeds no noise level: use ProgressiveTrainer"
            )
        if not 0 <= start < end <= len(modules):
            raise TrainingError(f"{label}: segment [{start}, {end}) is outside 0..{len(modules)}")
        check_loader(dataloader)
        n_batches = count_batches(dataloader)
        if n_batches == 0:
            raise TrainingError(f"{label}: the dataloader yielded no batches")
        accum = cfg.optimizer.grad_accumulation
        if steps is None:
            steps = cfg.max_steps or max(1, n_batches // accum)
        if not isinstance(steps, int) or steps < 1:
            raise TrainingError(f"{label}: steps must be an integer >= 1, got {steps!r}")
        opt = (
            groups
            if isinstance(groups, torch.optim.Optimizer)
            else build_optimizer(groups, cfg.optimizer)
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optimizer, steps))
        trainable = [p for g in opt.param_groups for p in g["params"]]
        trainable_ids = {id(p) for p in trainable}
        # The prefix may be cached only when nothing in it (embeddings included) trains.
        prefix_params = list(model.lexical.get_embeddings().parameters())
        if getattr(model, "position", None) is not None:
            prefix_params.append(model.position.weight)
        for m in modules[:start]:
            prefix_params += list(m.parameters())
        frozen_prefix = not any(id(p) in trainable_ids for p in prefix_params)
        cached = cache_prefix and start > 0 and frozen_prefix

        t0 = time.perf_counter()
        batches = None
        if cached:
            limit = min(steps * accum, n_batches)
            batches = self._fill_cache(model, modules, start, dataloader, ratio, limit)
        cache_time = time.perf_counter() - t0
        names = [g["name"] for g in opt.param_groups]
        self._emit(
            "on_unit_start",
            {"label": label, "steps": steps, "param_groups": names, **(info or {})},
        )

        model.train()
        losses: list[float] = []
        step_times: list[float] = []
        tokens, micro, step = 0, 0, 0
        running, step_tokens = 0.0, 0
        t_start = t_step = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if batches is not None:  # cycled in stored order, the next ones read ahead from disk
            cycle = CachedSource(
                batches,
                prefetch=functools.partial(self.cache.prefetch, start - 1),
                depth=cfg.caching.prefetch,
            )
        while step < steps:
            if batches is not None:
                source = (cycle.next() for _ in batches)
            else:
                source = enumerate(dataloader)
            for item in source:
                if step >= steps:
                    break
                loss, n_tok = self._batch_loss(model, modules, start, end, item, ratio, cached)
                value = loss.item()
                if not math.isfinite(value):
                    raise TrainingError(
                        f"loss is {value} at step {step} (batch {micro % accum} of the step) "
                        f"while training {label}"
                    )
                # Token-weighted: the step's gradient is that of the mean loss over all its
                # tokens, as one batch holding every micro-batch would give.
                (loss * n_tok).backward()
                running += value * n_tok
                step_tokens += n_tok
                tokens += n_tok
                micro += 1
                if micro % accum:
                    continue
                if step_tokens > 0:
                    for p in trainable:
                        if p.grad is not None:
                            p.grad.div_(step_tokens)
                clip_gradients(trainable, cfg.optimizer.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if after_step is not None:
                    after_step()
                losses.append(running / step_tokens if step_tokens else 0.0)
                running, step_tokens = 0.0, 0
                now = time.perf_counter()
                step_times.append(now - t_step)
                t_step = now
                step += 1
                if self.callbacks:
                    elapsed = now - t_start
                    self._emit(
                        "on_step",
                        {
                            "label": label,
                            "step": step,
                            "steps": steps,
                            "loss": losses[-1],
                            "lr": opt.param_groups[0]["lr"],
                            "tokens": tokens,
                            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                        },
                    )
        wall = time.perf_counter() - t_start
        record = {
            "label": label,
            **(info or {}),
            "cached_prefix": cached,
            **unit_record(
                losses=losses,
                step_times=step_times,
                steps=steps,
                tokens=tokens,
                wall=wall,
                cache_fill_s=cache_time,
                device=self.device,
                cache=self.cache.memory_stats() if cached else None,
                param_groups=names,
            ),
        }
        self.history.append(record)
        self._emit("on_unit_end", record)
        return record


def flat_blocks(rack) -> list[nn.Module]:
    """The rack's blocks in order, over all stacks."""
    if not hasattr(rack, "stacks"):
        raise ModelError(f"expected a Rack, got {type(rack).__name__}")
    return [b for s in rack.stacks for b in s.blocks]
