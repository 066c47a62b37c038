"""The stages of a progressive run as the planner sees them (:mod:`stackwise.run.plan`): the rack
after each stage's stack was added, the trunk frozen and converted, and ``requires_grad`` set the
way the progressive trainer sets it; and the saved activations of one micro-batch of the stage.

Built on the meta device (the planner's ``torch.device("meta")``): nothing here allocates
real memory.
The freezing rules mirror ``ProgressiveTrainer``: the new stack trains; the final norm and an
untied LM head train at every append stage (and at the first prepend stage); embeddings (and a
time embedding) train at the first stage only; a ``qlora`` trunk trains its adapters. The CPU
tests compare the result with what a real run's optimizer holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from stackwise.model.architecture import Rack
from stackwise.training.growth import stage_steps_share
from stackwise.training.rack_builder import ProgressiveRackBuilder
from stackwise.training.strategies.masking import IGNORE_INDEX


@dataclass
class StageState:
    stage: int
    rack: Rack
    new_idx: int
    trained_blocks: int
    total_blocks: int
    uses_cache: bool
    start: int  # the stack the forward pass starts at (a cached boundary when > 0)
    steps: int | None
    config: object

    def activations(self, autocast_dtype: torch.dtype | None) -> tuple[int, int]:
        """(saved activation bytes of one micro-batch, the same with per-block activation
        checkpointing) of this stage's forward pass and loss."""
        return saved_activation_bytes(self, autocast_dtype)


def _trunk_name(training) -> str:
    if not training.quantization_enabled:
        return "full"
    return training.quantization_type


def _set_trainable(builder: ProgressiveRackBuilder, stage: int, new_idx: int, config) -> None:
    rack = builder.rack
    prog, q = config.training.progressive, config.training.qlora
    append = builder.building_mode == "append"
    for i in range(len(rack.stacks)):
        if i != new_idx:
            rank, alpha = builder.trunk_rank(i, prog.target_stacks, q)
            builder.freeze_stack(i, prog.trunk_strategy, q, rank=rank, alpha=alpha)
    for p in rack.stacks[new_idx].parameters():
        p.requires_grad_(True)
    first = stage == 0
    emb = list(rack.lexical.get_embeddings().parameters())
    if rack.position is not None:
        emb.append(rack.position.weight)
    table = rack.lexical.get_embeddings().table.weight
    frozen_table = rack.lexical.embedding_option == "embed_tokens" and not table.requires_grad
    for p in emb:
        p.requires_grad_(first and not (p is table and frozen_table))
    if rack.time_embedding is not None:
        rack.time_embedding.requires_grad_(first)
    head_trains = append or first
    rack.final_norm.requires_grad_(head_trains)
    if not rack.lexical.tie_embeddings:
        rack.lexical.get_lm_head().requires_grad_(head_trains)
    if prog.trunk_strategy == "qlora" and not first:
        for p in builder.trunk_adapter_parameters(exclude=new_idx):
            p.requires_grad_(True)


def end_to_end_state(config) -> StageState:
    """The whole rack (``progressive.target_stacks`` stacks) trained at once: every weight
    trains, nothing is cached (the baseline progressive training is compared with)."""
    t = config.training
    builder = ProgressiveRackBuilder(config)
    for _ in range(t.progressive.target_stacks):
        builder.add_stack(precision="full")
    builder.rack.requires_grad_(True)
    blocks = sum(len(s) for s in builder.rack.stacks)
    return StageState(0, builder.rack, 0, blocks, blocks, False, 0, t.max_steps or None, config)


def stage_states(config) -> Iterator[StageState]:
    """One :class:`StageState` per stage of ``config`` (``progressive.target_stacks`` stages)."""
    t = config.training
    prog = t.progressive
    builder = ProgressiveRackBuilder(config)
    append = builder.building_mode == "append"
    qlora = prog.trunk_strategy == "qlora"
    plan = prog.target_stacks
    for stage in range(plan):
        builder.add_stack(precision=_trunk_name(t))
        new_idx = builder.n_stacks - 1 if append else 0
        _set_trainable(builder, stage, new_idx, config)
        uses_cache = prog.cache_activations and stage > 0
        if prog.steps_per_stack:
            steps = prog.steps_per_stack
        elif t.max_steps:
            steps = stage_steps_share(t.max_steps, plan, stage, prog.stage_budget)
        else:
            steps = None
        yield StageState(
            stage=stage,
            rack=builder.rack,
            new_idx=new_idx,
            trained_blocks=len(builder.rack.stacks[new_idx]),
            total_blocks=sum(len(s) for s in builder.rack.stacks),
            uses_cache=uses_cache,
            start=new_idx if (uses_cache and append and not qlora) else 0,
            steps=steps,
            config=config,
        )


class _StagePass(nn.Module):
    """The stage's forward pass and loss as one module, for ``functional_call``."""

    def __init__(self, state: StageState) -> None:
        super().__init__()
        self.rack, self.state = state.rack, state

    def forward(self, ids: Tensor, labels: Tensor, time: Tensor | None) -> Tensor:
        rack, state = self.rack, self.state
        if state.uses_cache:  # the cached boundary: no gradient flows into it
            h = torch.zeros(*ids.shape, state.config.model.d_model)
        else:
            h = rack.embed(ids, time)
        # the loss as the training step computes it (the fused head-and-loss op)
        return rack.token_loss(rack.forward_from(h, state.start), labels, ignore_index=IGNORE_INDEX)


@contextlib.contextmanager
def _fake_cpu() -> Iterator[None]:
    """Fake CPU tensors; the RoPE table cache is emptied before and after so no fake table
    outlives the pass (or a real one leaks into it)."""
    from stackwise.ops.rope import _cached_tables

    _cached_tables.cache_clear()
    try:
        with FakeTensorMode(), torch.device("cpu"):
            yield
    finally:
        _cached_tables.cache_clear()


def saved_activation_bytes(
    state: StageState, autocast_dtype: torch.dtype | None
) -> tuple[int, int]:
    """Run the stage's forward pass and loss on fake CPU copies of the (meta) rack's weights and
    add up what autograd saves for the backward pass (weights excluded, each storage once); see
    the planner's docstring."""
    rack, cfg = state.rack, state.config
    b, s = cfg.training.batch_size, cfg.training.seq_len
    seen: dict[int, int] = {}
    per_block: dict[int, int] = {}
    block_inputs: dict[int, int] = {}
    current = [-1]

    def pack(t: Tensor) -> Tensor:
        key = t.untyped_storage()._cdata
        if key not in weights and key not in seen:
            seen[key] = current[0]
            per_block[current[0]] = per_block.get(current[0], 0) + t.untyped_storage().nbytes()
        return t

    handles = []
    blocks = [blk for stack in rack.stacks[state.start :] for blk in stack.blocks]
    for i, blk in enumerate(blocks):

        def pre(module, args, i=i):
            current[0] = i
            block_inputs[i] = args[0].untyped_storage().nbytes()

        def post(module, args, out):
            current[0] = -1

        handles.append(blk.register_forward_pre_hook(pre))
        handles.append(blk.register_forward_hook(post))
    step = _StagePass(state)
    ctx = (
        torch.autocast("cpu", dtype=autocast_dtype)
        if autocast_dtype is not None
        else torch.autocast("cpu", enabled=False)
    )
    try:
        with _fake_cpu():
            tensors = {
                name: torch.empty(t.shape, dtype=t.dtype).requires_grad_(t.requires_grad)
                for name, t in [*step.named_parameters(), *step.named_buffers()]
            }
            weights = {t.untyped_storage()._cdata for t in tensors.values()}
            ids = torch.zeros(b, s, dtype=torch.long)
            time = torch.zeros(b) if rack.time_embedding is not None else None
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
                torch.func.functional_call(step, tensors, (ids, torch.zeros_like(ids), time))
    finally:
        for handle in handles:
            handle.remove()
    total = sum(per_block.values())
    trained = [i for i in per_block if i >= 0]
    if not trained:
        return total, total
    checkpointed = (
        per_block.get(-1, 0)
        + sum(block_inputs[i] for i in trained)
        + max(per_block[i] for i in trained)
    )
    return total, min(total, checkpointed)


__all__ = ["StageState", "end_to_end_state", "saved_activation_bytes", "stage_states"]
