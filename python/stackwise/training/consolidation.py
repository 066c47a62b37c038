"""The consolidation phase of a progressive run, and activation recomputation of the trunk.

``training.progressive.consolidation_steps`` (N > 0): after the last stage every stack is put
in NF4 with LoRA adapters (``training.qlora`` rank / alpha / dropout, ``progressive_rank`` as
for a qlora trunk; stacks that already have trunk adapters keep them) and the whole rack trains
jointly for N optimizer steps: the adapters of every stack (at ``qlora.lr``) and the final norm
and an untied LM head (at ``learning_rate``); the embeddings stay frozen. Nothing is cached:
every step runs the whole rack. The N steps are part of ``training.max_steps`` (the stages share
the rest). The phase is recorded in the trainer's history with ``"phase": "consolidation"``; it
writes no checkpoint of its own, so a run resumed from the last stage's checkpoint runs it again
from the same rack (the same result). Implemented for the append mode and the clm objective in
one process; other settings raise :class:`ConfigurationError` / :class:`TrainingError`.

``training.progressive.trunk_checkpointing``: the stacks the stage does not train run under
activation checkpointing (``Stack.recompute``), so when gradients flow through them (a qlora
trunk, the consolidation phase) the backward pass keeps each stack's input and recomputes its
inside, one stack at a time, instead of keeping every block's activations.
"""

from __future__ import annotations

import math
import time

import torch

from stackwise.exceptions import ConfigurationError, TrainingError
from stackwise.training.batches import LoaderSource
from stackwise.training.core.qlora import adapter_parameters, merge_adapters, wrap_linears
from stackwise.training.loop import unit_record
from stackwise.training.optim import build_optimizer, clip_gradients, lr_lambda


def set_trunk_recompute(rack, trained: set[int], enabled: bool) -> None:
    """When ``enabled``, the stacks not in ``trained`` that run with gradients (they hold
    trainable adapters, or a trained stack comes before them) recompute their activations in
    the backward pass; every other stack (and every stack when not ``enabled``) does not."""
    downstream = False
    for i, stack in enumerate(rack.stacks):
        if i in trained:
            downstream = True
            stack.recompute = False
            continue
        adapters = any(p.requires_grad for p in stack.parameters())
        stack.recompute = bool(enabled) and (adapters or downstream)
        downstream = downstream or adapters


def _adapt_every_stack(builder, plan: int) -> list:
    """NF4 + LoRA on every stack that has no trunk adapters yet; returns all adapter tensors."""
    q = builder.config.training.qlora
    freeze_up = builder.model_config.freeze_up_proj
    for i, stack in enumerate(builder.rack.stacks):
        if builder.strategies[i] == "qlora":
            continue
        rank, alpha = builder.trunk_rank(i, plan, q)
        for p in stack.parameters():
            p.requires_grad_(False)
        merge_adapters(stack)  # a dual-LoRA stack folds its own LoRA in first
        wrap_linears(stack, rank, alpha, q.dropout, "nf4", freeze_up)
        builder.converted[i] = True
        builder.strategies[i] = "qlora"
        builder.adapter_ranks[i] = [rank, float(alpha)]
    params = [p for stack in builder.rack.stacks for p in adapter_parameters(stack)]
    for p in params:
        p.requires_grad_(True)
    return params


def consolidate(trainer, builder, dataloader, eval_loader, steps: int, plan: int) -> dict:
    """Run the consolidation phase (module docstring) on ``trainer``'s rack; returns its record,
    which the caller appends to the history."""
    prog = trainer.progressive
    if builder.building_mode != "append" or prog.training_objective != "clm":
        raise ConfigurationError(
            "consolidation_steps is implemented for building_mode 'append' with the 'clm' "
            f"objective, not {builder.building_mode!r} / {prog.training_objective!r}",
            "training.progressive.consolidation_steps",
        )
    if trainer.dist is not None:
        raise TrainingError("the consolidation phase does not run data-parallel yet")
    rack = builder.rack
    cfg = trainer.training
    for p in rack.parameters():
        p.requires_grad_(False)
    adapters = _adapt_every_stack(builder, plan)
    rack.to(trainer.device)
    head = list(rack.final_norm.parameters())
    if not rack.lexical.tie_embeddings:
        head += list(rack.lexical.get_lm_head().parameters())
    for p in head:
        p.requires_grad_(True)
    groups = [
        {"name": "consolidation_lora", "params": adapters, "lr": cfg.qlora.lr},
        {"name": "head", "params": head, "lr": cfg.learning_rate},
    ]
    set_trunk_recompute(rack, set(), prog.trunk_checkpointing)
    opt = build_optimizer(groups, cfg.optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optimizer, steps))
    trainable = [p for g in groups for p in g["params"]]
    stage = len(trainer.history)
    base_step = trainer.global_step
    info = {
        "stage": stage,
        "stack_index": -1,
        "n_stacks": len(rack.stacks),
        "target_stacks": plan,
        "steps": steps,
        "mask_ratio": 0.0,
        "param_groups": [g["name"] for g in groups],
        "group_lr": {g["name"]: g["lr"] for g in groups},
        "cache_fill_s": 0.0,
        "start_step": 0,
        "phase": "consolidation",
    }
    trainer._emit("on_stage_start", info)
    source = LoaderSource(dataloader, trainer._count(dataloader))
    accum = cfg.optimizer.grad_accumulation
    eval_every = cfg.eval_every if eval_loader is not None else 0
    losses: list[float] = []
    step_times: list[float] = []
    tokens = 0
    rack.train()
    t_start = time.perf_counter()
    for step in range(1, steps + 1):
        t_step = time.perf_counter()
        micro = [trainer._prepare(rack, source.next(), 0.0, False, 0) for _ in range(accum)]
        n_total = sum(m["n_tok"] for m in micro)
        step_loss = 0.0
        for m in micro:
            weight = m["n_tok"] / n_total if n_total else 1.0 / accum
            with trainer._autocast():
                loss = trainer._forward_loss(rack, m)
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingError(f"loss is {value} in the consolidation phase, step {step}")
            (loss * weight).backward()
            step_loss += value * weight
        clip_gradients(trainable, cfg.optimizer.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        step_times.append(time.perf_counter() - t_step)
        tokens += n_total
        elapsed = time.perf_counter() - t_start
        trainer._emit(
            "on_step",
            {
                "stage": stage,
                "stack_index": -1,
                "step": step,
                "steps": steps,
                "global_step": base_step + step,
                "loss": step_loss,
                "lr": opt.param_groups[0]["lr"],
                "tokens": tokens,
                "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                "step_ms": 1e3 * step_times[-1],
            },
        )
        if eval_every and step % eval_every == 0 and step < steps:
            ev = trainer.evaluate(rack, eval_loader, 0.0)
            rack.train()
            trainer._emit(
                "on_eval",
                {"stage": stage, "step": step, "global_step": base_step + step, "eval_loss": ev},
            )
    record = {
        "stage": stage,
        "stack_index": -1,
        "n_stacks": len(rack.stacks),
        "mask_ratio": 0.0,
        "phase": "consolidation",
        **unit_record(
            losses=losses,
            step_times=step_times,
            steps=steps,
            tokens=tokens,
            wall=time.perf_counter() - t_start,
            cache_fill_s=0.0,
            device=trainer.device,
            cache=None,
            param_groups=[g["name"] for g in groups],
        ),
    }
    if eval_loader is not None:
        record["eval_loss"] = trainer.evaluate(rack, eval_loader, 0.0)
        trainer._emit(
            "on_eval",
            {
                "stage": stage,
                "step": steps,
                "global_step": base_step + steps,
                "eval_loss": record["eval_loss"],
            },
        )
    trainer._emit("on_stage_end", record)
    return record


__all__ = ["consolidate", "set_trunk_recompute"]
