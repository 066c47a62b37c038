"""Data parallelism as an object the training loop holds: :class:`DataParallel`.

With one process (``DataParallel(None)``) every method is a pass-through. In a ``torchrun`` job
(a :class:`~stackwise.training.distributed.DistributedContext` with W > 1):

- **data**: :meth:`shard` gives this rank rows ``[r::W]`` of each global batch (global sample ids
  kept, so masks match the one-process run);
- **gradients**: :meth:`wrap` wraps a unit's trainable part, as one module computing a
  micro-batch's loss, in ``DistributedDataParallel`` (``ddp``) or FSDP2 ``fully_shard``
  (``fsdp``: a twin of the model shares every frozen tensor, replicated; only the trainable
  parameters are copied and sharded, and :meth:`sync_weights` gathers them back). Every
  micro-batch but a step's last skips the gradient collective (:meth:`no_sync`); each
  micro-batch's loss is weighted by its share of the *global* step's target tokens times W
  (:attr:`loss_scale`: the collectives average), so the update equals the one-process update;
- **checkpoints**: :meth:`save` lets rank 0 write while every rank waits at a barrier; with
  ``fsdp`` the sharded optimizer state of a mid-stage checkpoint goes to
  ``<dir>/sharded/<checkpoint>/`` through ``torch.distributed.checkpoint`` (:meth:`load_optimizer`
  reads it back; a resume needs the same world size and strategy);
- **cache**: spill files of rank r go to ``<spill_dir>/rank<r>``.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stackwise.exceptions import TrainingError
from stackwise.training.checkpoint import checkpoint_folders
from stackwise.training.distributed import DistributedContext


class _LossModule(nn.Module):
    """A unit's forward pass as one module (what DDP / FSDP wrap): micro-batch -> loss."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, m) -> Tensor:
        return self._loss_fn(self.model, m)


class DataParallel:
    """See the module docstring. ``context``: the job's context, or None for one process."""

    def __init__(self, context: DistributedContext | None = None) -> None:
        self.ctx = context if context is not None and context.enabled else None
        self._wrapped: nn.Module | None = None
        self._pairs: list[tuple[Tensor, Tensor]] | None = None  # fsdp: (rack param, shard)

    @property
    def enabled(self) -> bool:
        return self.ctx is not None

    @property
    def is_main(self) -> bool:
        return self.ctx is None or self.ctx.is_main

    @property
    def loss_scale(self) -> float:
        return 1.0 if self.ctx is None else float(self.ctx.world_size)

    def global_sum(self, value: float) -> float:
        return value if self.ctx is None else self.ctx.all_reduce_sum(value)

    def barrier(self) -> None:
        if self.ctx is not None:
            self.ctx.barrier()

    # -- per run --------------------------------------------------------------------------------

    def shard(self, dataloader):
        return dataloader if self.ctx is None or dataloader is None else self.ctx.shard(dataloader)

    def spill_dir(self, spill_dir):
        return spill_dir if self.ctx is None else self.ctx.spill_dir(spill_dir)

    # -- per unit -------------------------------------------------------------------------------

    def wrap(self, model: nn.Module, groups: list[dict], loss_fn: Callable) -> list[dict]:
        """Wrap the unit's trainable part; returns the optimizer groups (on the sharded
        parameters with ``fsdp``)."""
        self._wrapped, self._pairs = None, None
        if self.ctx is None:
            return groups
        if self.ctx.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            cuda = self.ctx.device.type == "cuda"
            self._wrapped = DistributedDataParallel(
                _LossModule(model, loss_fn),
                device_ids=[self.ctx.device] if cuda else None,
                forward_sync_buffers=False,  # buffers (RoPE tables, quantized bytes) never change
            )
            return groups
        return self._wrap_fsdp(model, groups, loss_fn)

    def _wrap_fsdp(self, model: nn.Module, groups: list[dict], loss_fn: Callable) -> list[dict]:
        from torch.distributed.fsdp import fully_shard

        trainable = {id(p) for g in groups for p in g["params"] if p.requires_grad}
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        memo: dict[int, Any] = {id(model.config): model.config}
        for p in model.parameters():
            if id(p) not in trainable:
                memo[id(p)] = p
        for b in model.buffers():
            memo[id(b)] = b
        twin = copy.deepcopy(model, memo)
        frozen = {p for p in twin.parameters() if not p.requires_grad}
        for stack in twin.stacks:
            for block in getattr(stack, "blocks", [stack]):
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, ignored_params=frozen & set(block.parameters()))
        root = fully_shard(_LossModule(twin, loss_fn), ignored_params=frozen)
        twin_params = dict(twin.named_parameters(remove_duplicate=False))
        out = []
        for g in groups:
            g = dict(g)
            g["params"] = [twin_params[names[id(p)]] for p in g["params"] if p.requires_grad]
            out.append(g)
        self._pairs = [
            (p, twin_params[names[id(p)]]) for g in groups for p in g["params"] if p.requires_grad
        ]
        self._wrapped = root
        return out

    def loss(self, model: nn.Module, m, loss_fn: Callable) -> Tensor:
        """A micro-batch's loss, through the wrapped module when there is one."""
        if self._wrapped is not None:
            return self._wrapped(m)
        return loss_fn(model, m)

    def no_sync(self, skip: bool):
        """Within a step, every micro-batch but the last skips the gradient collective."""
        model = self._wrapped
        if model is None or not skip:
            return contextlib.nullcontext()
        if hasattr(model, "no_sync"):
            return model.no_sync()
        return _fsdp_no_sync(model)

    def sync_weights(self) -> None:
        """With ``fsdp``: gather the trained (sharded) parameters into the model (collective)."""
        if self._pairs is None:
            return
        with torch.no_grad():
            for orig, sharded in self._pairs:
                full = sharded.full_tensor() if hasattr(sharded, "full_tensor") else sharded
                orig.copy_(full.to(orig.device, orig.dtype))

    def unwrap(self) -> None:
        self.sync_weights()
        self._wrapped, self._pairs = None, None

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self, write: Callable[[Any], Path], directory, name: str | None, optimizer=None):
        """Run ``write(optimizer)`` (which writes checkpoint ``name`` into ``directory``) on rank
        0 while the others wait. With ``fsdp`` and a mid-stage ``name``, every rank first writes
        its shard of the optimizer state, and ``write`` receives the param groups only."""
        if self.ctx is None:
            return write(optimizer)
        self.sync_weights()
        if self._pairs is not None and name is not None and optimizer is not None:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            state = {"optimizer": get_optimizer_state_dict(self._wrapped, optimizer)}
            dcp.save(state, checkpoint_id=str(_sharded_dir(directory, name)))
            optimizer = _GroupsOnly(optimizer)  # the state tensors live in the DCP folder
        folder = None
        if self.ctx.is_main:
            folder = write(optimizer)
            _prune_sharded(directory)
        self.ctx.barrier()
        return folder

    def load_optimizer(self, optimizer, directory, folder: str) -> None:
        """After a mid-stage resume loaded the optimizer's groups: with ``fsdp``, read this
        rank's shard of its state back from the DCP folder of checkpoint ``folder``."""
        if self._pairs is None or directory is None:
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = _sharded_dir(directory, os.path.basename(folder))
        if not (path / ".metadata").is_file():
            raise TrainingError(
                f"checkpoint {folder} was taken within a stage but its sharded optimizer state "
                f"{path} is missing (was it written by a 'ddp' or 1-process run?)"
            )
        state = {"optimizer": get_optimizer_state_dict(self._wrapped, optimizer)}
        dcp.load(state, checkpoint_id=str(path))
        set_optimizer_state_dict(self._wrapped, optimizer, state["optimizer"])
        optimizer.zero_grad(set_to_none=True)  # get_optimizer_state_dict left zero grads


class _GroupsOnly:
    """An optimizer's param groups without its (sharded) state, for the checkpoint's JSON."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return {"state": {}, "param_groups": self.optimizer.state_dict()["param_groups"]}


def _sharded_dir(directory, name: str) -> Path:
    return Path(directory) / "sharded" / name


def _prune_sharded(directory) -> None:
    """Drop sharded optimizer folders whose checkpoint was pruned."""
    root = _sharded_dir(directory, "")
    if not root.is_dir():
        return
    kept = {p.name for p in checkpoint_folders(directory)}
    for p in root.iterdir():
        if p.name not in kept:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


__all__ = ["DataParallel"]
