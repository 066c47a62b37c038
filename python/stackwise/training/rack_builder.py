"""``ProgressiveRackBuilder``: grows a rack one stack at a time, to the right (append) or to the
left (prepend), and freezes, converts or adapts the stacks that are no longer trained.

    rack_builder = ProgressiveRackBuilder(config=config, building_mode="append")
    stack1 = rack_builder.append_stack(n_blocks=4, precision="full")
    stack2 = rack_builder.append_stack(n_blocks=4, precision="half")
    rack = rack_builder.build_rack()

``precision`` is the storage precision a stack takes once it becomes part of the frozen trunk
(full | half | bf16 | int8 | nf4 | fp8 ...: :data:`stackwise.precision.TRUNK_STORAGE`); the
stack being trained is always full precision.
``build_rack()`` returns the one rack being trained (same embeddings, head and final norm),
reflecting every stack added so far.

Dual-LoRA (``training.qlora.new_stack_lora``): each new stack's linear layers carry a LoRA
(:class:`QLoRAAdapter` over the full-precision layer, ``qlora.rank``/``qlora.alpha``) that trains
with the stack in its own optimizer group; when the stack is frozen the LoRA is merged into its
weights, and a ``qlora`` trunk then puts its own NF4 adapters on it (with
``qlora.progressive_rank``, of a rank decaying with the stack's age, :meth:`trunk_rank`).
With ``training.progressive.time_interpretation: input`` the rack gets a time embedding.
"""

from __future__ import annotations

import torch

from stackwise import precision as _precision
from stackwise.exceptions import ConfigurationError, TrainingError
from stackwise.model.architecture import Rack, Stack
from stackwise.model.mlgka import MLGKALayer
from stackwise.training.core.qlora import adapter_parameters, merge_adapters, wrap_linears
from stackwise.training.strategies.quantization import QuantizationManager, canonical_precision


class ProgressiveRackBuilder:
    def __init__(self, config, building_mode: str | None = None) -> None:
        self.config = config
        self.model_config = config.model
        mode = building_mode or config.training.progressive.building_mode
        if mode not in ("append", "prepend"):
            raise ConfigurationError(
                f"{mode!r} is not 'append' or 'prepend'", "training.progressive.building_mode"
            )
        self.building_mode = mode
        progressive = config.training.progressive
        # The rack's own initialisation (position table, time embedding) does not depend on the
        # caller's RNG state: it is drawn from training.seed, and the global RNG is left as is.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.training.seed)
            self.rack = Rack(
                self.model_config,
                stacks=[],
                time_embedding=progressive.time_interpretation == "input",
            )
        self.stack_lora = bool(config.training.qlora.new_stack_lora)
        self.precisions: list[str] = []
        self.converted: list[bool] = []
        self.strategies: list[str] = []  # how each frozen stack was converted ("" if not yet)
        self.adapter_ranks: list[list[float] | None] = []  # [rank, alpha] of trunk adapters
        self._layer_seed = 0

    @property
    def n_stacks(self) -> int:
        return len(self.rack.stacks)

    def _new_stack(self, n_blocks: int | None, precision: str) -> Stack:
        _precision.canonical(precision, _precision.TRUNK_STORAGE, key="precision")
        n = n_blocks or self.model_config.architecture.blocks_per_stack
        if n < 1:
            raise ConfigurationError(f"n_blocks must be >= 1, got {n}")
        from stackwise.model.architecture import _layer_kwargs

        blocks = []
        for _ in range(n):
            blocks.append(MLGKALayer(seed=self._layer_seed, **_layer_kwargs(self.model_config)))
            self._layer_seed += 1
        stack = Stack(blocks)
        if self.stack_lora:
            q = self.config.training.qlora
            wrap_linears(stack, q.rank, q.alpha, q.dropout, None, self.model_config.freeze_up_proj)
        return stack

    def append_stack(self, n_blocks: int | None = None, precision: str = "full") -> Stack:
        """Add a stack on the right (after the current last one)."""
        stack = self._new_stack(n_blocks, precision)
        self.rack.stacks.append(stack)
        self.precisions.append(precision)
        self.converted.append(False)
        self.strategies.append("")
        self.adapter_ranks.append(None)
        return stack

    def prepend_stack(self, n_blocks: int | None = None, precision: str = "full") -> Stack:
        """Add a stack on the left (before the current first one)."""
        stack = self._new_stack(n_blocks, precision)
        self.rack.stacks.insert(0, stack)
        self.precisions.insert(0, precision)
        self.converted.insert(0, False)
        self.strategies.insert(0, "")
        self.adapter_ranks.insert(0, None)
        return stack

    def load_trunk(self, stacks: list[Stack], precision: str = "full") -> None:
        """Append already-trained stacks (e.g. an imported pretrained model's, see
        :mod:`stackwise.model.hf_init`) as the trunk: frozen and converted to ``precision`` when
        the next stack trains, like any stack the rack has outgrown."""
        if self.n_stacks:
            raise TrainingError("load_trunk needs an empty rack builder")
        _precision.canonical(precision, _precision.TRUNK_STORAGE, key="precision")
        for stack in stacks:
            self.rack.stacks.append(stack)
            self.precisions.append(precision)
            self.converted.append(False)
            self.strategies.append("")
            self.adapter_ranks.append(None)
            self._layer_seed += len(stack)

    def add_stack(self, n_blocks: int | None = None, precision: str = "full") -> Stack:
        """Append or prepend, following ``building_mode``."""
        if self.building_mode == "append":
            return self.append_stack(n_blocks, precision)
        return self.prepend_stack(n_blocks, precision)

    def build_rack(self) -> Rack:
        if self.n_stacks == 0:
            raise TrainingError("the rack has no stacks yet: append_stack or prepend_stack first")
        return self.rack

    def trunk_rank(self, index: int, planned_stacks: int | None = None, qlora_cfg=None):
        """``(rank, alpha)`` of the trunk adapters of stack ``index``. With
        ``qlora.progressive_rank`` the stack k places older than the newest trunk stack of the
        planned rack (``planned_stacks``, default the current size) gets rank
        max(min_rank, round(rank * rank_decay**k)) and alpha scaled by the same factor (so
        alpha / rank, the update's scale, stays); otherwise ``(rank, alpha)``."""
        q = qlora_cfg or self.config.training.qlora
        if not q.progressive_rank:
            return q.rank, float(q.alpha)
        n = self.n_stacks
        created = index if self.building_mode == "append" else n - 1 - index
        newest_trunk = max(planned_stacks or n, n) - 2
        k = max(0, newest_trunk - created)
        rank = max(q.min_rank, round(q.rank * q.rank_decay**k))
        return rank, float(q.alpha) * rank / q.rank

    def freeze_stack(
        self,
        index: int,
        strategy: str = "frozen",
        qlora_cfg=None,
        rank: int | None = None,
        alpha: float | None = None,
    ) -> None:
        """Freeze stack ``index``: no gradient to its weights; fold in its own LoRA (dual-LoRA)
        and convert it to its storage precision once; with ``strategy="qlora"`` wrap its linear
        layers in trainable :class:`QLoRAAdapter` s over NF4 weights (``qlora_cfg``: rank,
        alpha, dropout; ``rank``/``alpha`` override them, see :meth:`trunk_rank`)."""
        stack = self.rack.stacks[index]
        for p in stack.parameters():
            p.requires_grad_(False)
        if self.converted[index]:
            return
        merge_adapters(stack)
        if strategy == "qlora":
            rank = rank if rank is not None else (qlora_cfg.rank if qlora_cfg else 16)
            alpha = alpha if alpha is not None else (qlora_cfg.alpha if qlora_cfg else 32.0)
            dropout = qlora_cfg.dropout if qlora_cfg else 0.0
            wrap_linears(stack, rank, alpha, dropout, "nf4", self.model_config.freeze_up_proj)
            self.adapter_ranks[index] = [rank, alpha]
        else:
            precision = canonical_precision(self.precisions[index])
            if precision != "fp32":
                QuantizationManager(keep_backup=False).convert_to_precision(stack, precision)
        self.converted[index] = True
        self.strategies[index] = strategy

    def trunk_adapter_parameters(self, exclude: int) -> list:
        """LoRA parameters of every stack but ``exclude``."""
        return [
            p
            for i, stack in enumerate(self.rack.stacks)
            if i != exclude
            for p in adapter_parameters(stack)
        ]

    def stack_lora_parameters(self, index: int) -> list:
        """The dual-LoRA parameters of stack ``index`` (empty unless ``new_stack_lora``)."""
        return adapter_parameters(self.rack.stacks[index])
