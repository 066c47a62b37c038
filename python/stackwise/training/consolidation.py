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

from stackwise.exceptions import ConfigurationError, TrainingError
from stackwise.training.core.qlora import adapter_parameters, merge_adapters, wrap_linears
from stackwise.training.loop import Unit, count_batches, rack_stacks
from stackwise.training.units import head_parameters


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
    """Run the consolidation phase (module docstring) on ``trainer``'s rack through the
    trainer's :class:`~stackwise.training.loop.TrainLoop`; returns its record, which the caller
    appends to the history."""
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
    groups = [
        {"name": "consolidation_lora", "params": adapters, "lr": cfg.qlora.lr},
        {"name": "head", "params": head_parameters(rack, True), "lr": cfg.learning_rate},
    ]
    set_trunk_recompute(rack, set(), prog.trunk_checkpointing)
    stage = len(trainer.history)
    unit = Unit(
        label="the consolidation phase",
        model=rack,
        modules_of=rack_stacks,
        start=0,
        end=len(rack.stacks),
        groups=groups,
        steps=steps,
        identity={
            "stage": stage,
            "stack_index": -1,
            "n_stacks": len(rack.stacks),
            "target_stacks": plan,
            "mask_ratio": 0.0,
            "phase": "consolidation",
        },
        index=stage,
        plan=plan,
        start_event="on_stage_start",
        end_event="on_stage_end",
    )
    record = trainer.loop.run(
        unit,
        dataloader,
        count_batches(dataloader),
        eval_loader=eval_loader,
        base_step=trainer.global_step,
    )
    record.pop("target_stacks", None)
    return record


__all__ = ["consolidate", "set_trunk_recompute"]
