"""``ProgressiveRackBuilder``: grows a rack one stack at a time, to the right (append) or to the
left (prepend), and freezes, converts or adapts the stacks that are no longer trained.

    rack_builder = ProgressiveRackBuilder(config=config, building_mode="append")
    stack1 = rack_builder.append_stack(n_blocks=4, precision="full")
    stack2 = rack_builder.append_stack(n_blocks=4, precision="half")
    rack = rack_builder.build_rack()

``precision`` is the storage precision a stack takes once it becomes part of the frozen trunk
(full | half | bf16 | int8 | nf4 | fp8); the stack being trained is always full precision.
``build_rack()`` returns the one rack being trained (same embeddings, head and final norm),
reflecting every stack added so far.
"""

from __future__ import annotations

from torch import nn

from stackwise.exceptions import ConfigurationError, TrainingError
from stackwise.model.architecture import Rack, Stack
from stackwise.model.mlgka import MLGKALayer
from stackwise.training.core.fusion_trainer import QLoRAAdapter
from stackwise.training.strategies.quantization import QuantizationManager, canonical_precision

PRECISIONS = ("full", "half", "bf16", "int8", "nf4", "fp8")


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
        self.rack = Rack(self.model_config, stacks=[])
        self.precisions: list[str] = []
        self.converted: list[bool] = []
        self.strategies: list[str] = []  # how each frozen stack was converted ("" if not yet)
        self._layer_seed = 0

    @property
    def n_stacks(self) -> int:
        return len(self.rack.stacks)

    def _new_stack(self, n_blocks: int | None, precision: str) -> Stack:
        if precision not in PRECISIONS:
            raise ConfigurationError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
        n = n_blocks or self.model_config.architecture.blocks_per_stack
        if n < 1:
            raise ConfigurationError(f"n_blocks must be >= 1, got {n}")
        from stackwise.model.architecture import _layer_kwargs

        blocks = []
        for _ in range(n):
            blocks.append(MLGKALayer(seed=self._layer_seed, **_layer_kwargs(self.model_config)))
            self._layer_seed += 1
        return Stack(blocks)

    def append_stack(self, n_blocks: int | None = None, precision: str = "full") -> Stack:
        """Add a stack on the right (after the current last one)."""
        stack = self._new_stack(n_blocks, precision)
        self.rack.stacks.append(stack)
        self.precisions.append(precision)
        self.converted.append(False)
        self.strategies.append("")
        return stack

    def prepend_stack(self, n_blocks: int | None = None, precision: str = "full") -> Stack:
        """Add a stack on the left (before the current first one)."""
        stack = self._new_stack(n_blocks, precision)
        self.rack.stacks.insert(0, stack)
        self.precisions.insert(0, precision)
        self.converted.insert(0, False)
        self.strategies.insert(0, "")
        return stack

    def add_stack(self, n_blocks: int | None = None, precision: str = "full") -> Stack:
        """Append or prepend, following ``building_mode``."""
        if self.building_mode == "append":
            return self.append_stack(n_blocks, precision)
        return self.prepend_stack(n_blocks, precision)

    def build_rack(self) -> Rack:
        if self.n_stacks == 0:
            raise TrainingError("the rack has no stacks yet: append_stack or prepend_stack first")
        return self.rack

    def freeze_stack(self, index: int, strategy: str = "frozen", qlora_cfg=None) -> None:
        """Freeze stack ``index``: no gradient to its weights; convert it to its storage
        precision once; with ``strategy="qlora"`` wrap its linear layers in trainable
        :class:`QLoRAAdapter` s over NF4 weights (``qlora_cfg``: rank, alpha, dropout)."""
        stack = self.rack.stacks[index]
        for p in stack.parameters():
            p.requires_grad_(False)
        if self.converted[index]:
            return
        if strategy == "qlora":
            rank = qlora_cfg.rank if qlora_cfg else 16
            alpha = qlora_cfg.alpha if qlora_cfg else 32.0
            dropout = qlora_cfg.dropout if qlora_cfg else 0.0
            for name, module in list(stack.named_modules()):
                fixed = self.model_config.freeze_up_proj and name.endswith("up_proj")
                if isinstance(module, nn.Linear) and not fixed:
                    parent_name, _, attr = name.rpartition(".")
                    parent = stack.get_submodule(parent_name) if parent_name else stack
                    setattr(
                        parent,
                        attr,
                        QLoRAAdapter(
                            module, rank=rank, alpha=alpha, dropout=dropout, quantization="nf4"
                        ),
                    )
        else:
            precision = canonical_precision(self.precisions[index])
            if precision != "fp32":
                QuantizationManager(keep_backup=False).convert_to_precision(stack, precision)
        self.converted[index] = True
        self.strategies[index] = strategy

    def trunk_adapter_parameters(self, exclude: int) -> list:
        """LoRA parameters of every stack but ``exclude``."""
        params = []
        for i, stack in enumerate(self.rack.stacks):
            if i == exclude:
                continue
            for m in stack.modules():
                if isinstance(m, QLoRAAdapter):
                    params += m.get_adaptation_parameters()
        return params
