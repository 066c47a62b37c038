""":class:`FusionTrainer` trains a model fusion-style: its blocks (groups of ``training.block_size``
layers) one at a time, each on top of a backbone of the blocks before it, which are frozen and
converted to a lower storage precision once their full-precision weights are backed up to disk
(:mod:`stackwise.training.backup`):

    trainer = FusionTrainer(config)                      # model built from the config
    results = trainer.train_with_frozen_backbone(dataloader)
    results = trainer.train_with_custom_model(layers, dataloader)   # a list of MLGKALayers

- ``fusion_mode="frozen"``: backbone blocks are converted to ``training.quantization_type``
  (QuantizationManager) and stay fixed; the current block reads their output from the
  activation cache.
- ``fusion_mode="trainable"`` (or ``"qlora"``): the backbone's linear layers become
  :class:`QLoRAAdapter` s over ``training.quantization_type`` weights; the adapters train with
  the current block (learning rate ``training.qlora.lr``), so the backbone runs every step.
- dual-LoRA (``training.qlora.new_stack_lora``, or ``dual_lora=True``): the current block's
  linear layers also carry a LoRA (``qlora.rank``/``qlora.alpha`` over the full-precision
  layer) that trains with the block in its own group ``current_block_lora`` at
  ``training.qlora.lr``, as ProgressiveTrainer's new stacks do; it is merged into the block's
  weights before the block is backed up and joins the backbone.

``QLoRAAdapter`` and the PEFT adapter functions live in :mod:`stackwise.training.core.qlora` and
are re-exported here, their documented import path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from stackwise.exceptions import ConfigurationError, TrainingError
from stackwise.model.architecture import Rack, Stack, _layer_kwargs
from stackwise.model.mlgka import MLGKALayer
from stackwise.model.quantized import QuantizedLinear
from stackwise.training.core.qlora import (
    QLoRAAdapter,
    adapter_parameters,
    load_peft_adapters,
    merge_adapters,
    save_peft_adapters,
    wrap_linears,
)
from stackwise.training.loop import flat_blocks
from stackwise.training.optim import build_optimizer
from stackwise.training.segment import SegmentTrainer
from stackwise.training.strategies.quantization import QuantizationManager, canonical_precision
from stackwise.training.units import embedding_parameters, head_parameters, trainable_parameters

# ---- fusion training --------------------------------------------------------------------------

FUSION_MODES = {"frozen": "frozen", "trainable": "trainable", "qlora": "trainable"}


class FusionTrainer(SegmentTrainer):
    """Fusion training (module docstring).

    Args:
        config: a :class:`~stackwise.config.base.StackWiseConfig`.
        model: a :class:`~stackwise.model.architecture.Rack`, a list of layers, or None for a
            rack of ``training.total_blocks`` blocks of ``training.block_size`` layers built from
            ``config.model`` (seeded with ``training.seed``). The blocks are groups of
            ``block_size`` consecutive layers of the model.
        dataloader: the default loader of the ``train*`` methods; without one anywhere, the
            training loader of the config's corpus (:func:`stackwise.data.create_data_loaders`).
        run_id: names the weight backup folder; default ``training.run_id`` or a new id.
        backup_dir: folder holding the run folders; default ``<checkpointing.dir>/backups``.
        backup_precision: precision of the disk backups ("fp32", "fp16" or "bf16").
        dual_lora: dual-LoRA (module docstring); default ``training.qlora.new_stack_lora``.
        steps_per_block: optimizer steps per block; default ``training.max_steps`` split
            evenly over the blocks, or one pass over the loader.
        cache_activations: read a frozen backbone's output from the activation cache (default
            ``training.progressive.cache_activations``).
        tokenizer_ids, callbacks: as :class:`~stackwise.training.trainer.Trainer`.
    """

    def __init__(
        self,
        config,
        model=None,
        dataloader=None,
        *,
        run_id: str | None = None,
        backup_dir: str | os.PathLike[str] | None = None,
        backup_precision: str = "fp32",
        dual_lora: bool | None = None,
        steps_per_block: int | None = None,
        cache_activations: bool | None = None,
        tokenizer_ids: dict[str, int] | None = None,
        callbacks=None,
    ) -> None:
        from stackwise.training.backup import canonical_backup_precision, new_run_id

        super().__init__(config, tokenizer_ids, callbacks)
        mode = config.training.fusion_mode
        if mode not in FUSION_MODES:
            raise ConfigurationError(
                f"{mode!r} is not one of {sorted(FUSION_MODES)}", "training.fusion_mode"
            )
        self.fusion_mode = FUSION_MODES[mode]
        self.dataloader = dataloader
        self.run_id = run_id or config.training.run_id or new_run_id()
        self.backup_root = backup_dir
        self.backup_precision = canonical_backup_precision(backup_precision)
        self.dual_lora = (
            bool(config.training.qlora.new_stack_lora) if dual_lora is None else bool(dual_lora)
        )
        self.steps_per_block = steps_per_block
        self.cache_activations = (
            config.training.progressive.cache_activations
            if cache_activations is None
            else bool(cache_activations)
        )
        self.backbone_precision = canonical_precision(config.training.quantization_type)
        self._model: Rack | None = None
        self.blocks: list[Stack] = []  # the fusion blocks, in order
        self.retired: list[bool] = []  # whether each block is part of the backbone
        self.set_model(model)

    # -- the model ------------------------------------------------------------------------------

    @property
    def model(self) -> Rack:
        return self._model

    def _wrap_layers(self, layers) -> Rack:
        layers = list(layers)
        if not layers:
            raise TrainingError("the model needs at least one layer")
        d = self.config.model.d_model
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Module) or getattr(layer, "d_model", d) != d:
                raise TrainingError(
                    f"layer {i} must be an MLGKALayer of d_model {d}, got "
                    f"{type(layer).__name__} of d_model {getattr(layer, 'd_model', '?')}"
                )
        size = self.training.block_size
        return Rack(
            self.config.model, [Stack(layers[i : i + size]) for i in range(0, len(layers), size)]
        )

    def set_model(self, model) -> None:
        """Use ``model`` (a Rack, a list of layers, or None to build one from the config)."""
        if model is None:
            t = self.training
            torch.manual_seed(self.seed)
            layers = [
                MLGKALayer(seed=i, **_layer_kwargs(self.config.model))
                for i in range(t.total_blocks * t.block_size)
            ]
            model = self._wrap_layers(layers)
        elif isinstance(model, (list, tuple, nn.ModuleList)):
            model = self._wrap_layers(model)
        elif not isinstance(model, Rack):
            raise TrainingError(
                f"model must be a Rack, a list of layers or None, got {type(model).__name__}"
            )
        layers = flat_blocks(model)
        if not layers:
            raise TrainingError("the model has no layers")
        size = self.training.block_size
        if all(len(s) == size for s in model.stacks):
            self.blocks = list(model.stacks)
        else:
            self.blocks = [Stack(layers[i : i + size]) for i in range(0, len(layers), size)]
        self._model = model
        self.retired = [False] * len(self.blocks)

    # -- backbone -------------------------------------------------------------------------------

    def _block_index(self, block: nn.Module, default: int) -> int:
        return next((i for i, b in enumerate(self.blocks) if b is block), default)

    def _wrap_with_lora(self, block: nn.Module, quantization: str | None) -> None:
        q = self.training.qlora
        wrap_linears(
            block, q.rank, q.alpha, q.dropout, quantization, self.config.model.freeze_up_proj
        )

    def retire_block(self, idx: int, trainable: bool | None = None) -> None:
        """Make block ``idx`` part of the backbone: back up its full-precision weights to disk,
        then freeze it and convert it (``trainable``: QLoRA adapters over the converted
        weights; default from ``fusion_mode``). Does nothing to a block already retired."""
        if self.retired[idx]:
            return
        trainable = self.fusion_mode == "trainable" if trainable is None else trainable
        block = self.blocks[idx]
        merge_adapters(block)
        self._save_full_precision_weights_to_disk({idx: block}, self.backup_precision)
        for p in block.parameters():
            p.requires_grad_(False)
        target = self.backbone_precision
        if trainable:
            self._wrap_with_lora(block, None if target == "fp32" else target)
        elif target != "fp32":
            QuantizationManager(keep_backup=False).convert_to_precision(block, target)
        block.to(self.device)
        self.retired[idx] = True

    # -- disk backups ---------------------------------------------------------------------------

    def backup_path(self, run_id: str | None = None):
        """The folder holding the weight backups of ``run_id`` (default this run)."""
        from stackwise.training.backup import backup_directory

        return backup_directory(self.config, run_id or self.run_id, self.backup_root)

    def _save_full_precision_weights_to_disk(self, trained_blocks, cache_precision: str = "fp32"):
        """Back up full-precision block weights: ``trained_blocks`` is a list of blocks (indexed
        by their place among :attr:`blocks`, else their position in the list) or a dict
        ``{block index: block or state dict}``. Returns the backup folder."""
        from stackwise.training.backup import save_full_precision_weights

        if isinstance(trained_blocks, Mapping):
            items = list(trained_blocks.items())
        else:
            items = [(self._block_index(b, i), b) for i, b in enumerate(trained_blocks)]
        states = {}
        for idx, block in items:
            if isinstance(block, nn.Module):
                if any(isinstance(m, (QuantizedLinear, QLoRAAdapter)) for m in block.modules()):
                    raise TrainingError(
                        f"block {idx} is already converted (it holds quantized layers or "
                        "adapters): its full-precision weights can no longer be backed up"
                    )
                block = block.state_dict()
            states[int(idx)] = block
        return save_full_precision_weights(self.backup_path(), states, cache_precision, self.run_id)

    def _restore_full_precision_weights_from_disk(
        self, run_id: str | None = None, cache_precision: str | None = None, block_indices=None
    ) -> dict[int, dict[str, Tensor]]:
        """``{block index: full-precision state dict}`` from the disk backup of ``run_id``
        (default this run); TrainingError names anything missing or corrupt."""
        from stackwise.training.backup import restore_full_precision_weights

        return restore_full_precision_weights(
            self.backup_path(run_id), block_indices, cache_precision
        )

    def restore_full_precision_blocks(self, block_indices=None, run_id: str | None = None) -> None:
        """Undo the conversion of backbone blocks (default: every retired one): their quantized
        layers and adapters become ``nn.Linear`` s again holding the backed-up weights, and
        train again. What backbone adapters learned after the backup is not part of it: merge
        them first (:meth:`QLoRAAdapter.merge`) and save a new backup to keep it."""
        indices = (
            [i for i, r in enumerate(self.retired) if r]
            if block_indices is None
            else list(block_indices)
        )
        restored = self._restore_full_precision_weights_from_disk(run_id, None, indices)
        for idx in indices:
            block = self.blocks[idx]
            for name, m in list(block.named_modules()):
                if isinstance(m, (QLoRAAdapter, QuantizedLinear)):
                    base = m.base_layer if isinstance(m, QLoRAAdapter) else m
                    has_bias = getattr(base, "bias", None) is not None
                    lin = nn.Linear(m.in_features, m.out_features, bias=has_bias)
                    parent_name, _, attr = name.rpartition(".")
                    parent = block.get_submodule(parent_name) if parent_name else block
                    setattr(parent, attr, lin)
            block.float()
            try:
                block.load_state_dict(restored[idx])
            except RuntimeError as exc:
                raise TrainingError(f"the backup of block {idx} does not fit it: {exc}") from exc
            trainable_parameters(block.to(self.device))
            self.retired[idx] = False

    # -- optimizer ------------------------------------------------------------------------------

    def _setup_fusion_optimizer(
        self, trainable_blocks, qlora_enabled: bool, current_block_idx: int
    ) -> torch.optim.Optimizer:
        """The optimizer of one fusion step: ``current_block`` (block ``current_block_idx`` of
        ``trainable_blocks``; lr ``training.learning_rate``), with dual-LoRA
        ``current_block_lora`` (its LoRA; lr ``training.qlora.lr``), ``qlora_backbone`` (the LoRA
        adapters of the blocks before it when ``qlora_enabled``, attached if missing; lr
        ``training.qlora.lr``), ``head`` (final norm, untied LM head) and, with block 0,
        ``embeddings``. Sets ``requires_grad`` to match: everything else is frozen."""
        blocks = list(trainable_blocks)
        if not 0 <= current_block_idx < len(blocks):
            raise TrainingError(
                f"current_block_idx {current_block_idx} is outside 0..{len(blocks) - 1}"
            )
        model = self.model
        for p in model.parameters():
            p.requires_grad_(False)
        current = blocks[current_block_idx]
        backbone = blocks[:current_block_idx]  # later blocks do not run: untouched
        if self.dual_lora and not adapter_parameters(current):
            self._wrap_with_lora(current, None)
        current_lora = adapter_parameters(current) if self.dual_lora else []
        lora_ids = {id(p) for p in current_lora}
        current_params = [p for p in trainable_parameters(current) if id(p) not in lora_ids]
        backbone_params = []
        if qlora_enabled:
            target = None if self.backbone_precision == "fp32" else self.backbone_precision
            for b in backbone:
                idx = self._block_index(b, -1)
                if idx >= 0:
                    self.retire_block(idx, trainable=True)  # backed up, then adapted
                if not adapter_parameters(b):  # a foreign block, or one retired frozen
                    self._wrap_with_lora(b, target)
                backbone_params += adapter_parameters(b)
        first = self._block_index(current, current_block_idx) == 0
        emb = embedding_parameters(model, first)
        head = head_parameters(model, True)
        t = self.training
        groups = [
            {"name": "current_block", "params": current_params, "lr": t.learning_rate},
            {"name": "current_block_lora", "params": current_lora, "lr": t.qlora.lr},
            {"name": "qlora_backbone", "params": backbone_params, "lr": t.qlora.lr},
            {"name": "head", "params": head, "lr": t.learning_rate},
            {"name": "embeddings", "params": emb, "lr": t.learning_rate},
        ]
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)
        return build_optimizer(groups, t.optimizer)

    # -- training -------------------------------------------------------------------------------

    def _loader(self, dataloader):
        """The loader given to the method, else the constructor's, else the training loader of
        the config's corpus (:func:`stackwise.data.create_data_loaders`)."""
        if dataloader is not None:
            return dataloader
        if self.dataloader is None:
            from stackwise.data import create_data_loaders

            self.dataloader = create_data_loaders(self.config)[0]
        return self.dataloader

    def _train_blocks(self, dataloader, trainable: bool, eval_loader=None) -> dict[str, Any]:
        loader = self._loader(dataloader)
        model = self.model.to(self.device)
        n = len(self.blocks)
        steps = self.steps_per_block
        if steps is None and self.training.max_steps:
            steps = max(1, self.training.max_steps // n)
        start = next((i for i, r in enumerate(self.retired) if not r), n)
        if start == n:
            raise TrainingError("every block is already part of the backbone: nothing to train")
        records = []
        for i in range(start, n):
            for j in range(i):
                self.retire_block(j, trainable)
            opt = self._setup_fusion_optimizer(self.blocks[: i + 1], trainable, i)
            torch.manual_seed(self.seed + i)
            records.append(
                self.train_segment(
                    model,
                    self.blocks,
                    i,
                    i + 1,
                    loader,
                    opt,
                    steps,
                    label=f"fusion block {i}",
                    ratio=self.unit_ratio(i + 1, n),
                    cache_prefix=self.cache_activations,
                    eval_loader=eval_loader,
                    info={
                        "fusion_mode": "trainable" if trainable else "frozen",
                        "index": i,
                        "block_index": i,
                        "n_blocks": n,
                        "mask_ratio": self.unit_ratio(i + 1, n),
                        "backbone_precision": self.backbone_precision,
                    },
                )
            )
        return {
            "history": records,
            "final": records[-1],
            "model": model,
            "run_id": self.run_id,
            "backup_dir": str(self.backup_path()),
        }

    def train_with_frozen_backbone(self, dataloader=None) -> dict[str, Any]:
        """Train each block in turn on a frozen, converted backbone (``fusion_mode="frozen"``);
        returns ``history`` (a record per block), ``final``, ``model``, ``run_id`` and
        ``backup_dir``."""
        return self._train_blocks(dataloader, trainable=False)

    def train_with_trainable_backbone(self, dataloader=None) -> dict[str, Any]:
        """Train each block in turn while the QLoRA adapters of the quantized backbone train
        with it (``fusion_mode="trainable"``); returns as :meth:`train_with_frozen_backbone`."""
        return self._train_blocks(dataloader, trainable=True)

    def train(self, dataloader=None, eval_loader=None) -> dict[str, Any]:
        """Train following ``training.fusion_mode`` (``eval_loader``: evaluate the whole model
        on it during and after each block)."""
        return self._train_blocks(dataloader, self.fusion_mode == "trainable", eval_loader)

    def train_with_custom_model(self, layers, dataloader=None) -> dict[str, Any]:
        """Wrap a user's list of layers (MLGKALayers of ``model.d_model``) into a rack with the
        config's embeddings and head, and train it as :meth:`train` does."""
        self.set_model(layers)
        return self.train(dataloader)


__all__ = [
    "FUSION_MODES",
    "FusionTrainer",
    "QLoRAAdapter",
    "load_peft_adapters",
    "save_peft_adapters",
]
