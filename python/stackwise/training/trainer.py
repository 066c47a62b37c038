"""``Trainer``: hierarchical training of a rack, one unit (block, group of blocks, stack or the
whole rack) at a time, each unit trained as the top of the model with the shared final norm and
LM head, on the cached boundary activations of the frozen blocks before it.

    trainer = Trainer(config=config)
    trainer.train_block(block, dataloader)     # one block (an index or a block of trainer.rack)
    trainer.train_stack(stack, dataloader)     # one stack (an index or a stack of trainer.rack)
    trainer.train_rack(rack, dataloader)       # everything end to end (the baseline)
    results = trainer.train(rack, dataloader)  # every unit of training.mode in turn

``training.mode`` decides the unit :meth:`Trainer.train` uses:

- ``layerwise``: each block in turn (greedy layer-wise training; block k reads the cached output
  of blocks 0..k-1 and feeds the head directly);
- ``blockwise``: groups of ``training.block_size`` consecutive blocks, in turn;
- ``stackwise``: each stack of the rack, in turn;
- ``rackwise`` (also ``end_to_end``): the whole rack end to end, one unit;
- ``fused``: fusion training, delegated to
  :class:`~stackwise.training.core.fusion_trainer.FusionTrainer`.

With the mlm / diffusion objectives, a unit ending at block k is trained at the mask ratio of
the ``training.masking`` schedule at k (deeper units see more masking; ``max_fraction``
everywhere when ``training.time_step_masking`` is false).

The embeddings train with the unit that holds block 0 (unless ``freeze_embeddings``) and are
frozen afterwards, so the cached activations of later units stay valid; the final norm (and an
untied LM head) train with every unit. Each unit takes ``max_steps`` optimizer steps when given,
else ``training.max_steps`` split evenly over the units of :meth:`train` (all of it for a single
call), else one pass over the loader. Each unit starts by seeding torch with ``training.seed``
plus its first block index, so its dropout is reproducible on its own. See
:mod:`stackwise.training.loop` for the loop itself (batches, objectives, gradient accumulation,
the cache) and the record each unit returns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stackwise.exceptions import ConfigurationError, TrainingError
from stackwise.model.architecture import Rack, Stack
from stackwise.training.core.fusion_trainer import FusionTrainer
from stackwise.training.loop import count_batches, flat_blocks
from stackwise.training.segment import SegmentTrainer
from stackwise.training.units import embedding_parameters, head_parameters, trainable_parameters

MODES = ("layerwise", "blockwise", "stackwise", "rackwise", "fused")
MODE_ALIASES = {"end_to_end": "rackwise"}


def canonical_mode(mode: str) -> str:
    """The mode's canonical name, or :class:`ConfigurationError` naming ``training.mode``."""
    mode = MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ConfigurationError(
            f"{mode!r} is not one of {list(MODES) + list(MODE_ALIASES)}", "training.mode"
        )
    return mode


class Trainer(SegmentTrainer):
    """See the module docstring.

    Args:
        config: a :class:`~stackwise.config.base.StackWiseConfig`.
        rack: the rack to train; default one built from ``config.model`` (seeded with
            ``training.seed``) on first use. The ``train_*`` methods that take a rack replace it.
        tokenizer_ids: ``{"mask": id, "pad": id}`` for the mlm / diffusion objectives.
        callbacks: objects with ``on_unit_start`` / ``on_step`` / ``on_unit_end`` methods.
        cache_activations: read the frozen prefix from the activation cache (default
            ``training.progressive.cache_activations``); False recomputes it every step.
    """

    def __init__(
        self,
        config,
        rack: Rack | None = None,
        tokenizer_ids: dict[str, int] | None = None,
        callbacks=None,
        cache_activations: bool | None = None,
    ) -> None:
        super().__init__(config, tokenizer_ids, callbacks)
        self._tokenizer_ids = tokenizer_ids
        self.backup_dir = None  # where mode 'fused' backs blocks up (default: see FusionTrainer)
        self.mode = canonical_mode(config.training.mode)
        self.cache_activations = (
            config.training.progressive.cache_activations
            if cache_activations is None
            else bool(cache_activations)
        )
        self._rack = rack

    @property
    def rack(self) -> Rack:
        if self._rack is None:
            torch.manual_seed(self.seed)
            self._rack = Rack.from_config(self.config.model)
        return self._rack

    @rack.setter
    def rack(self, rack: Rack) -> None:
        if not isinstance(rack, Rack):
            raise TrainingError(f"rack must be a stackwise Rack, got {type(rack).__name__}")
        self._rack = rack

    # -- units ----------------------------------------------------------------------------------

    def _block_index(self, block) -> int:
        blocks = flat_blocks(self.rack)
        if isinstance(block, int) and not isinstance(block, bool):
            if not 0 <= block < len(blocks):
                raise TrainingError(f"block index {block} is outside 0..{len(blocks) - 1}")
            return block
        for i, b in enumerate(blocks):
            if b is block:
                return i
        raise TrainingError(
            f"the {type(block).__name__} passed as block is not a block of the trainer's rack; "
            "pass its index, or the rack it belongs to (rack=...)"
        )

    def _stack_range(self, stack) -> tuple[int, int, int]:
        stacks = list(self.rack.stacks)
        if isinstance(stack, int) and not isinstance(stack, bool):
            if not 0 <= stack < len(stacks):
                raise TrainingError(f"stack index {stack} is outside 0..{len(stacks) - 1}")
            idx = stack
        else:
            idx = next((i for i, s in enumerate(stacks) if s is stack), None)
            if idx is None:
                raise TrainingError(
                    f"the {type(stack).__name__} passed as stack is not a stack of the trainer's "
                    "rack; pass its index, or the rack it belongs to (rack=...)"
                )
        start = sum(len(s) for s in stacks[:idx])
        return idx, start, start + len(stacks[idx])

    def units(self, mode: str | None = None) -> list[tuple[str, int, int, int]]:
        """``(kind, index, start block, end block)`` of each unit of ``mode`` (default
        ``training.mode``), in training order."""
        mode = canonical_mode(mode or self.mode)
        n = len(flat_blocks(self.rack))
        if mode == "layerwise":
            return [("block", i, i, i + 1) for i in range(n)]
        if mode == "blockwise":
            size = self.training.block_size
            return [("blocks", j, s, min(n, s + size)) for j, s in enumerate(range(0, n, size))]
        if mode == "stackwise":
            return [("stack", i, *self._stack_range(i)[1:]) for i in range(len(self.rack.stacks))]
        if mode == "rackwise":
            return [("rack", 0, 0, n)]
        raise ConfigurationError("'fused' has no hierarchical units", "training.mode")

    def n_units(self) -> int:
        """How many units :meth:`train` trains in ``training.mode``."""
        if self.mode == "fused":
            n = len(flat_blocks(self.rack))
            return -(-n // self.training.block_size)
        return len(self.units())

    def _train_range(
        self, kind: str, index: int, start: int, end: int, dataloader, steps, eval_loader=None
    ) -> dict[str, Any]:
        rack = self.rack.to(self.device)
        blocks = flat_blocks(rack)
        for p in rack.parameters():
            p.requires_grad_(False)
        unit_params = [p for b in blocks[start:end] for p in trainable_parameters(b)]
        emb_params = embedding_parameters(rack, start == 0)
        time_params = [] if rack.time_embedding is None else list(rack.time_embedding.parameters())
        for p in time_params:
            p.requires_grad_(start == 0)
        head_params = head_parameters(rack, True)
        name = "blocks" if kind == "rack" else f"current_{kind}"
        lr = self.training.learning_rate
        groups = [
            {"name": name, "params": unit_params, "lr": lr},
            {"name": "head", "params": head_params, "lr": lr},
            {"name": "embeddings", "params": emb_params, "lr": lr},
            {"name": "time_embedding", "params": time_params, "lr": lr},
        ]
        label = "rack" if kind == "rack" else f"{kind} {index}"
        ratio = self.unit_ratio(end, len(blocks))
        torch.manual_seed(self.seed + start)  # dropout of this unit, reproducible on its own
        return self.train_segment(
            rack,
            blocks,
            start,
            end,
            dataloader,
            groups,
            steps,
            label=label,
            ratio=ratio,
            cache_prefix=self.cache_activations,
            eval_loader=eval_loader,
            info={
                "mode": self.mode,
                "unit": kind,
                "index": index,
                "blocks": [start, end],
                "mask_ratio": ratio,
            },
        )

    # -- the documented entry points ------------------------------------------------------------

    def train_block(
        self, block: nn.Module | int, dataloader, max_steps: int | None = None, rack=None
    ) -> dict[str, Any]:
        """Train one block (its index in the rack, over all stacks, or the block itself) on the
        cached output of the blocks before it; returns the unit's record."""
        if rack is not None:
            self.rack = rack
        i = self._block_index(block)
        return self._train_range("block", i, i, i + 1, dataloader, max_steps)

    def train_stack(
        self, stack: Stack | int, dataloader, max_steps: int | None = None, rack=None
    ) -> dict[str, Any]:
        """Train one stack (its index or the stack itself) on the cached output of the stacks
        before it; returns the unit's record."""
        if rack is not None:
            self.rack = rack
        idx, start, end = self._stack_range(stack)
        return self._train_range("stack", idx, start, end, dataloader, max_steps)

    def train_rack(
        self, rack: Rack | None, dataloader, max_steps: int | None = None
    ) -> dict[str, Any]:
        """Train the whole rack end to end (embeddings, every block, head); returns the record."""
        if rack is not None:
            self.rack = rack
        n = len(flat_blocks(self.rack))
        return self._train_range("rack", 0, 0, n, dataloader, max_steps)

    def train(
        self, rack=None, dataloader=None, max_steps: int | None = None, eval_loader=None
    ) -> dict[str, Any]:
        """Train every unit of ``training.mode`` in order. ``rack`` is a Rack, a config (whose
        model is built) or None (the trainer's rack). ``max_steps`` is per unit; by default
        ``training.max_steps`` is split evenly over the units. Returns ``history`` (one record
        per unit), ``final`` (the last record) and ``rack``."""
        if dataloader is None:
            raise TrainingError("train: no dataloader given")
        if isinstance(rack, Rack):
            self.rack = rack
        elif rack is not None and hasattr(rack, "model"):
            torch.manual_seed(self.seed)
            self.rack = Rack.from_config(rack.model)
        elif rack is not None:
            raise TrainingError(f"train: expected a Rack or a config, got {type(rack).__name__}")
        if self.mode == "fused":
            fusion = FusionTrainer(
                self.config,
                model=self.rack,
                dataloader=dataloader,
                steps_per_block=max_steps,
                tokenizer_ids=self._tokenizer_ids,
                callbacks=self.callbacks,
                backup_dir=self.backup_dir,
            )
            out = fusion.train(eval_loader=eval_loader)
            self.history.extend(fusion.history)
            return {**out, "rack": self.rack}
        units = self.units()
        steps = max_steps
        if steps is None and self.training.max_steps:
            steps = max(1, self.training.max_steps // len(units))
        if steps is None and count_batches(dataloader) == 0:
            raise TrainingError("train: the dataloader yielded no batches")
        records = [self._train_range(*u, dataloader, steps, eval_loader) for u in units]
        return {"history": records, "final": records[-1], "rack": self.rack}


__all__ = ["MODES", "SegmentTrainer", "Trainer", "canonical_mode"]
