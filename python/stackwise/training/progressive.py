"""``ProgressiveTrainer``: trains a rack stack by stack.

    trainer = ProgressiveTrainer(config=config)
    results = trainer.train_rack(rack_builder, dataloader, target_stacks=3)

- **append** (left to right): stack s trains on top of the frozen trunk (stacks 0..s-1). The
  trunk's output for each batch is computed once, stored in the :class:`CacheManager`, and read
  back for every step of the stage, so the trunk is not recomputed. With a ``qlora`` trunk the
  trunk's LoRA adapters train too, so the cache holds the trunk's *input* (the embeddings) and the
  trunk runs with gradients flowing into the adapters only. Embeddings train with stack 0 and are
  frozen afterwards (cached activations stay valid); the final norm and head train at every stage.
- **prepend** (right to left, depth as time): stack 0 trains with the head at the lowest mask
  ratio; each new stack is inserted on the left and trained at a higher ratio through the frozen
  suffix and head; the (frozen) embeddings of the corrupted input are what is cached.

Objectives (``training.progressive.training_objective``): ``clm`` (next token), ``mlm`` (80/10/10
corruption at the stage's ratio) and ``diffusion`` (absorbing-mask corruption at the stage's
ratio r_k from the :class:`MaskScheduler`, highest on the left in prepend mode). Masks depend on
(sample id, ratio, seed) only.

A batch is a LongTensor [B, S] of token ids or a dict with ``input_ids`` and optionally
``attention_mask`` (True = real token), ``labels`` and ``sample_id``.
"""

from __future__ import annotations

import math
import resource
import time
from typing import Any

import torch
from torch import Tensor

from stackwise.exceptions import TrainingError
from stackwise.training.optim import build_optimizer, clip_gradients, lr_lambda
from stackwise.training.rack_builder import ProgressiveRackBuilder
from stackwise.training.strategies.caching import CacheManager
from stackwise.training.strategies.masking import (
    MaskScheduler,
    clm_labels,
    diffusion_corrupt,
    mlm_corrupt,
    token_loss,
)


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class ProgressiveTrainer:
    """See the module docstring. ``config`` is a :class:`StackWiseConfig`."""

    def __init__(
        self,
        config,
        tokenizer_ids: dict[str, int] | None = None,
        checkpoint_dir: str | None = None,
        callbacks: list | None = None,
    ) -> None:
        self.config = config
        # Objects with any of on_stage_start(info), on_step(info), on_eval(info),
        # on_stage_end(record); each gets a plain dict (see _emit's callers for the keys).
        self.callbacks = list(callbacks or [])
        self.checkpoint_dir = checkpoint_dir
        self.training = config.training
        self.progressive = config.training.progressive
        dev = self.training.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        ids = tokenizer_ids or {}
        vocab = config.model.vocab_size
        self.mask_token_id = ids.get("mask", vocab - 1)
        self.pad_token_id = ids.get("pad")
        self.special_ids = tuple(v for k, v in ids.items() if v is not None)
        self.seed = self.training.seed
        self.history: list[dict[str, Any]] = []
        self.cache: CacheManager | None = None

    def _emit(self, event: str, info: dict[str, Any]) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(info)

    @property
    def global_step(self) -> int:
        """Optimizer-loop steps taken over all finished stages."""
        return sum(int(h.get("steps", 0)) for h in self.history)

    # -- batches --------------------------------------------------------------------------------

    def _parse(self, batch, batch_idx: int) -> dict[str, Tensor]:
        if isinstance(batch, Tensor):
            batch = {"input_ids": batch}
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TrainingError(
                f"a batch must be a LongTensor [B, S] or a dict with 'input_ids', got "
                f"{type(batch).__name__}"
            )
        ids = batch["input_ids"]
        if (
            not isinstance(ids, Tensor)
            or ids.dim() != 2
            or ids.dtype not in (torch.int64, torch.int32)
        ):
            raise TrainingError(
                f"input_ids must be an integer tensor [B, S], got "
                f"{getattr(ids, 'shape', type(ids))}"
            )
        b, s = ids.shape
        mask = batch.get("attention_mask")
        sid = batch.get("sample_id")
        if sid is None:
            sid = torch.arange(b) + batch_idx * b
        return {
            "input_ids": ids.long(),
            "attention_mask": None if mask is None else mask.bool(),
            "labels": batch.get("labels"),
            "sample_id": torch.as_tensor(sid).long(),
        }

    def _corrupt(self, parsed: dict[str, Tensor], ratio: float) -> tuple[Tensor, Tensor]:
        ids, attn = parsed["input_ids"], parsed["attention_mask"]
        objective = self.progressive.training_objective
        if objective == "clm":
            labels = parsed["labels"] if parsed["labels"] is not None else clm_labels(ids, attn)
            return ids, labels
        masking = self.training.masking
        if objective == "mlm":
            return mlm_corrupt(
                ids,
                parsed["sample_id"],
                ratio,
                seed=self.seed,
                mask_token_id=self.mask_token_id,
                vocab_size=self.config.model.vocab_size,
                special_ids=self.special_ids,
                attention_mask=attn,
                mask_prob=masking.mask_token_prob,
                random_prob=masking.random_token_prob,
            )
        return diffusion_corrupt(
            ids,
            parsed["sample_id"],
            ratio,
            seed=self.seed,
            mask_token_id=self.mask_token_id,
            special_ids=self.special_ids,
            attention_mask=attn,
        )

    def stage_ratio(self, stage: int, target: int) -> float:
        """Mask ratio of the stack trained at ``stage`` in a rack of ``target`` stacks."""
        m = self.training.masking
        prepend = self.progressive.building_mode == "prepend"
        sched = MaskScheduler(m.min_fraction, m.max_fraction, m.schedule, reverse=prepend)
        position = target - 1 - stage if prepend else stage
        return sched.get_mask_fraction(position, target)

    # -- training -------------------------------------------------------------------------------

    def train_rack(
        self, rack_builder: ProgressiveRackBuilder, dataloader, target_stacks=None, eval_loader=None
    ) -> dict[str, Any]:
        """Grow the rack to ``target_stacks`` stacks (default: the configured target), training
        each new stack; calling again with a larger target continues from the current rack."""
        target = self.progressive.target_stacks if target_stacks is None else target_stacks
        if not isinstance(target, int) or target < 1:
            raise TrainingError(f"target_stacks must be an integer >= 1, got {target!r}")
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
                spill_dir=cm.spill_dir,
            )
        # Mask ratios follow the planned depth (the configured target, or more), so a rack grown
        # over several calls gets the same schedule as one grown in one call.
        plan = max(target, self.progressive.target_stacks)
        while rack_builder.n_stacks < target:
            stage = rack_builder.n_stacks
            rack_builder.add_stack(precision=self._trunk_precision())
            rack.to(self.device)
            self.history.append(
                self._train_stage(rack_builder, dataloader, stage, plan, eval_loader)
            )
            if self.checkpoint_dir is not None and self.training.checkpointing.enabled:
                from stackwise.training.checkpoint import save_stage_checkpoint

                save_stage_checkpoint(self.checkpoint_dir, self, rack_builder)
        return {
            "history": self.history,
            "final": self.history[-1] if self.history else {},
            "rack": rack,
        }

    @classmethod
    def resume(cls, checkpoint_dir: str, config):
        """``(trainer, rack_builder)`` from the newest stage checkpoint in ``checkpoint_dir``;
        ``trainer.train_rack(rack_builder, ...)`` then continues with the next stage."""
        from stackwise.training.checkpoint import load_stage_checkpoint

        return load_stage_checkpoint(checkpoint_dir, config)

    def _trunk_precision(self) -> str:
        if not self.training.quantization_enabled:
            return "full"
        q = self.training.quantization_type
        return {"fp32": "full", "fp16": "half", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8"}.get(q, q)

    def _stage_steps(self, n_batches: int, target: int) -> int:
        p = self.progressive
        if p.steps_per_stack:
            return p.steps_per_stack
        per_stage = self.training.max_steps // max(1, target) if self.training.max_steps else 0
        return per_stage or p.epochs_per_stack * n_batches

    def _train_stage(self, builder, dataloader, stage: int, target: int, eval_loader) -> dict:
        rack = builder.rack
        cfg, prog = self.training, self.progressive
        append = builder.building_mode == "append"
        new_idx = len(rack.stacks) - 1 if append else 0
        qlora = prog.trunk_strategy == "qlora"
        for i in range(len(rack.stacks)):
            if i != new_idx:
                builder.freeze_stack(i, prog.trunk_strategy, cfg.qlora)
        new_stack = rack.stacks[new_idx]
        for p in new_stack.parameters():
            p.requires_grad_(True)
        first = stage == 0
        emb_params = list(rack.lexical.get_embeddings().parameters())
        if rack.position is not None:
            emb_params.append(rack.position.weight)
        for p in emb_params:
            p.requires_grad_(first and p is not None and not self._frozen_table(p, rack))
        head_trains = append or first
        head_params = list(rack.final_norm.parameters())
        if not rack.lexical.tie_embeddings:
            head_params += list(rack.lexical.get_lm_head().parameters())
        for p in head_params:
            p.requires_grad_(head_trains)
        groups = [
            {
                "name": "current_stack",
                "params": list(new_stack.parameters()),
                "lr": cfg.learning_rate,
            }
        ]
        if head_trains:
            groups.append({"name": "head", "params": head_params, "lr": cfg.learning_rate})
        if first:
            groups.append({"name": "embeddings", "params": emb_params, "lr": cfg.learning_rate})
        if qlora and not first:
            groups.append(
                {
                    "name": "qlora_trunk",
                    "params": builder.trunk_adapter_parameters(exclude=new_idx),
                    "lr": cfg.qlora.lr,
                }
            )
        ratio = self.stage_ratio(stage, target)

        # Which boundary the stage reads: append -> the trunk's output (its input with a qlora
        # trunk, whose adapters train); prepend -> the embeddings. Stage 0 reads raw ids, since
        # the embeddings train with it.
        use_cache = prog.cache_activations and not first
        cache_block = 0 if (qlora or not append) else new_idx
        n_batches = self._count(dataloader)
        if n_batches == 0:
            raise TrainingError("the dataloader yielded no batches")
        steps = self._stage_steps(n_batches, target)
        t0 = time.perf_counter()
        # Only as many batches as the stage will use are cached (a stage of S steps reads S
        # batches, cycling when the loader has fewer).
        batches = (
            self._fill_cache(rack, dataloader, ratio, cache_block, limit=min(steps, n_batches))
            if use_cache
            else None
        )
        cache_time = time.perf_counter() - t0
        opt = build_optimizer(groups, cfg.optimizer)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optimizer, steps))
        trainable = [p for g in opt.param_groups for p in g["params"]]
        base_step = self.global_step
        stage_info = {
            "stage": stage,
            "stack_index": new_idx,
            "n_stacks": len(rack.stacks),
            "target_stacks": target,
            "steps": steps,
            "mask_ratio": ratio if prog.training_objective != "clm" else 0.0,
            "param_groups": [g["name"] for g in opt.param_groups],
            "cache_fill_s": cache_time,
        }
        self._emit("on_stage_start", stage_info)
        eval_every = cfg.eval_every if eval_loader is not None else 0
        rack.train()
        losses: list[float] = []
        step_times: list[float] = []
        tokens = 0
        t_start = time.perf_counter()
        step = 0
        accum = cfg.optimizer.grad_accumulation
        while step < steps:
            source = batches if batches is not None else enumerate(dataloader)
            for item in source:
                if step >= steps:
                    break
                t_step = time.perf_counter()
                loss, n_tok = self._step_loss(rack, item, ratio, use_cache, cache_block)
                if not math.isfinite(loss.item()):
                    raise TrainingError(
                        f"loss is {loss.item()} at stage {stage} (stack {new_idx}), step {step}"
                    )
                (loss / accum).backward()
                if (step + 1) % accum == 0 or step + 1 == steps:
                    clip_gradients(trainable, cfg.optimizer.grad_clip)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                step_times.append(time.perf_counter() - t_step)
                tokens += n_tok
                step += 1
                if self.callbacks:
                    elapsed = time.perf_counter() - t_start
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
            if n_batches == 0:
                raise TrainingError("the dataloader yielded no batches")
        wall = time.perf_counter() - t_start
        record = {
            "stage": stage,
            "stack_index": new_idx,
            "n_stacks": len(rack.stacks),
            "mask_ratio": ratio if prog.training_objective != "clm" else 0.0,
            "losses": losses,
            "step_ms": [1e3 * t for t in step_times],
            "steps": steps,
            "tokens": tokens,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "wall_s": wall,
            "cache_fill_s": cache_time,
            "peak_memory_bytes": _peak_memory_bytes(self.device),
            "cache": self.cache.memory_stats() if use_cache else None,
            "param_groups": [g["name"] for g in opt.param_groups],
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

    def _fill_cache(self, rack, dataloader, ratio, cache_block, limit: int) -> list:
        """Run the frozen part once per batch (the first ``limit`` batches) and store its output;
        returns the batch ids."""
        self.cache.clear()
        ids = []
        with torch.no_grad():
            for batch_idx, batch in enumerate(dataloader):
                if batch_idx >= limit:
                    break
                parsed = self._parse(batch, batch_idx)
                inputs, labels = self._corrupt(parsed, ratio)
                h = rack.embed(inputs.to(self.device))
                mask = parsed["attention_mask"]
                if cache_block > 0:
                    h = rack.forward_from(
                        h, 0, cache_block, None if mask is None else mask.to(self.device)
                    )
                attn = mask if mask is not None else torch.ones_like(labels, dtype=torch.bool)
                companions = torch.stack([labels.cpu(), attn.long().cpu()])
                ids.append(self.cache.store_activations(cache_block, h.detach().cpu(), companions))
        if not ids:
            raise TrainingError("the dataloader yielded no batches")
        return ids

    def _step_loss(self, rack, item, ratio, use_cache, cache_block):
        dev = self.device
        if use_cache:
            bid = item
            h = self.cache.get_activations(cache_block, bid).to(dev)
            comp = self.cache.get_masks(cache_block, bid)
            labels, attn = comp[0].to(dev), comp[1].bool().to(dev)
            mask = None if bool(attn.all()) else attn
        else:
            batch_idx, batch = item
            parsed = self._parse(batch, batch_idx)
            inputs, labels = self._corrupt(parsed, ratio)
            mask = parsed["attention_mask"]
            mask = None if mask is None else mask.to(dev)
            h = rack.embed(inputs.to(dev))
            labels = labels.to(dev)
            cache_block = 0
        h = rack.forward_from(h, cache_block, len(rack.stacks), mask)
        logits = rack.logits(h)
        n_tok = int((labels != -100).sum())
        return token_loss(logits, labels), n_tok

    @torch.no_grad()
    def evaluate(self, rack, loader, ratio: float, max_batches: int = 50) -> float:
        """Mean loss of the full rack on ``loader`` at mask ratio ``ratio``."""
        was_training = rack.training
        rack.eval()
        total, count = 0.0, 0
        for batch_idx, batch in enumerate(loader):
            if batch_idx >= max_batches:
                break
            parsed = self._parse(batch, batch_idx)
            inputs, labels = self._corrupt(parsed, ratio)
            mask = parsed["attention_mask"]
            logits = rack(inputs.to(self.device), None if mask is None else mask.to(self.device))
            total += float(token_loss(logits, labels.to(self.device)))
            count += 1
        rack.train(was_training)
        if count == 0:
            raise TrainingError("the evaluation dataloader yielded no batches")
        return total / count
