"""Data-parallel progressive training on ``torch.distributed`` (``training.distributed``).

Launch W processes with ``torchrun --nproc_per_node=W script.py``; in each::

    ctx = DistributedContext.from_env(config)  # init_process_group: nccl on GPUs, gloo on CPU
    results = train_distributed(config, lambda ctx: train_batches, checkpoint_dir="ckpt")

or build a :class:`ProgressiveTrainer`: under torchrun (``WORLD_SIZE`` > 1, or an initialised
process group) it joins the job itself through :meth:`DistributedContext.from_env`.

- **Data**: ``train_rack`` takes the *global* batches (``training.batch_size`` = B); rank r reads
  rows ``[r::W]`` of each (:class:`~stackwise.data.sharding.ShardedBatches`), keeping global
  sample ids, so masks match the one-process run. A loader that already reads per-rank shares
  (``create_data_loaders(config, distributed=ctx)``) is used as it is.
- **Gradients**: the stage's trainable part (new stack, head, embeddings at stage 0, trunk
  adapters) is wrapped in ``DistributedDataParallel`` (``ddp``) or sharded with FSDP2
  ``fully_shard`` (``fsdp``; the frozen, possibly quantized trunk is replicated, left out of
  the sharding). Each micro-batch's loss is weighted by its share of the *global* step's target
  tokens times W (the collectives average over ranks), so the update equals the one-process
  update with batch B; the logged loss is the global one (an all-reduce per step).
- **Cache**: each rank caches its own boundary activations; spill files go to
  ``<spill_dir>/rank<r>``, budgets are per rank.
- **Checkpoints, callbacks**: rank 0 writes (the others wait at a barrier, so no rank reads a
  half-written checkpoint) and only rank 0 calls callbacks. With ``fsdp`` the trained weights are
  gathered into the rack for every checkpoint (consolidated safetensors, loadable by one
  process); within a stage (``checkpointing.every_steps``) the sharded optimizer state is
  written with ``torch.distributed.checkpoint`` (DCP) to ``<dir>/sharded/<checkpoint>/``, so a
  resume needs the same world size and strategy.
- **Errors**: :func:`train_distributed` prints ``rank N: <error>`` to stderr and re-raises, so the
  process exits non-zero and torchrun stops the other ranks.

With ``WORLD_SIZE`` unset or 1, nothing of this is active and training is unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stackwise.data.sharding import ShardedBatches
from stackwise.exceptions import ConfigurationError, TrainingError

_ACTIVE: DistributedContext | None = None


@dataclass
class DistributedContext:
    """Where this process stands in a data-parallel job. ``enabled`` is False for one
    process, and then every method is a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    strategy: str = "none"
    timeout_s: float = 600.0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, config, env: dict[str, str] | None = None) -> DistributedContext:
        """Read torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (``MASTER_ADDR``/
        ``MASTER_PORT`` are read by ``init_process_group``) and, for W > 1, join the process
        group (or adopt one already initialised) with ``training.distributed``'s backend and
        timeout. The context becomes the active one that trainers pick up."""
        global _ACTIVE
        env = os.environ if env is None else env
        dcfg = config.training.distributed
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
        dev = config.training.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if world <= 1:
            return cls(device=torch.device(dev))
        if dcfg.strategy == "none":
            raise ConfigurationError(
                f"is 'none' but the job runs {world} processes (WORLD_SIZE={world}); "
                "use 'ddp' or 'fsdp', or launch one process",
                "training.distributed.strategy",
            )
        if dev == "cuda":
            if not torch.cuda.is_available():
                raise ConfigurationError("is 'cuda' but no GPU is visible", "training.device")
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device(dev)
        backend = dcfg.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise ConfigurationError(
                "'nccl' needs CUDA devices; use 'gloo' on CPU", "training.distributed.backend"
            )
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=float(dcfg.timeout_s)),
            )
            owns = True
        elif dist.get_world_size() != world or dist.get_rank() != rank:
            raise TrainingError(
                f"the initialised process group is rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, the environment says {rank} of {world}"
            )
        ctx = cls(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            device=device,
            backend=dist.get_backend(),
            strategy=dcfg.strategy,
            timeout_s=float(dcfg.timeout_s),
            owns_group=owns,
        )
        _ACTIVE = ctx
        return ctx

    # -- collectives ----------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, value: float) -> float:
        """Sum of ``value`` over the ranks (float64)."""
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def all_reduce_mean(self, value: float) -> float:
        """Mean of ``value`` over the ranks (for logging)."""
        return self.all_reduce_sum(value) / self.world_size

    def shutdown(self) -> None:
        """Leave the process group (if this context created it)."""
        global _ACTIVE
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False
        if _ACTIVE is self:
            _ACTIVE = None

    # -- data and files -------------------------------------------------------------------------

    def shard(self, dataloader):
        """This rank's share of a re-iterable of global batches (unchanged for one process, or
        for a loader that already reads per-rank shares)."""
        if not self.enabled or _rank_sharded(dataloader):
            return dataloader
        return ShardedBatches(dataloader, self.rank, self.world_size)

    def spill_dir(self, spill_dir: str | os.PathLike[str] | None) -> str | None:
        """``<spill_dir>/rank<r>`` in a distributed run."""
        if spill_dir is None or not self.enabled:
            return None if spill_dir is None else os.fspath(spill_dir)
        return os.path.join(os.fspath(spill_dir), f"rank{self.rank}")


def _rank_sharded(loader) -> bool:
    return any(
        getattr(owner, "rank_sharded", False)
        for owner in (loader, getattr(loader, "sampler", None))
    )


def active_context() -> DistributedContext | None:
    """The context of :meth:`DistributedContext.from_env` while its group is up (W > 1)."""
    if _ACTIVE is not None and _ACTIVE.enabled and dist.is_initialized():
        return _ACTIVE
    return None


# ---- the trainer side ---------------------------------------------------------------------------


class _StageForward(nn.Module):
    """The stage's forward pass as one module (what DDP / FSDP wrap): micro-batch -> loss."""

    def __init__(self, rack: nn.Module, forward_loss: Callable) -> None:
        super().__init__()
        self.rack = rack
        self._forward_loss = forward_loss

    def forward(self, m: dict) -> Tensor:
        return self._forward_loss(self.rack, m)


class DistributedTrainerMixin:
    """Hooks :class:`ProgressiveTrainer` calls; all are pass-throughs when ``self.dist`` is
    None (one process)."""

    dist: DistributedContext | None = None
    _stage_model: nn.Module | None = None
    _fsdp: dict | None = None

    def _attach_distributed(self, distributed: DistributedContext | None) -> None:
        ctx = distributed if distributed is not None else active_context()
        if ctx is None and (dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1):
            ctx = DistributedContext.from_env(self.config)  # under torchrun: join the job
        self.dist = ctx if ctx is not None and ctx.enabled else None
        if self.dist is not None:
            self.device = self.dist.device

    # -- per run --------------------------------------------------------------------------------

    def _dist_loader(self, dataloader):
        return (
            dataloader if self.dist is None or dataloader is None else self.dist.shard(dataloader)
        )

    def _dist_spill_dir(self, spill_dir):
        return spill_dir if self.dist is None else self.dist.spill_dir(spill_dir)

    def _save_checkpoint(
        self,
        directory,
        trainer,
        builder,
        progress=None,
        optimizer=None,
        scheduler=None,
        extra_rng=None,
    ):
        """``checkpoint.save_checkpoint`` on rank 0; every rank waits until it is written. With
        ``fsdp`` the weights are gathered first and, within a stage, every rank writes its shard
        of the optimizer state with ``torch.distributed.checkpoint`` to
        ``<dir>/sharded/<checkpoint name>/`` before rank 0 moves ``latest``."""
        from stackwise.training.checkpoint import save_checkpoint

        if self.dist is None:
            return save_checkpoint(
                directory, trainer, builder, progress, optimizer, scheduler, extra_rng
            )
        self._sync_trained_weights()
        if self._fsdp is not None and progress is not None:
            name = f"stage-{progress['stage']:03d}-step-{progress['step']:06d}"
            self._save_sharded_optimizer(_sharded_dir(directory, name), optimizer)
            optimizer = _GroupsOnly(optimizer)  # the state tensors live in the DCP folder
        folder = None
        if self.dist.is_main:
            folder = save_checkpoint(
                directory, trainer, builder, progress, optimizer, scheduler, extra_rng
            )
            _prune_sharded(directory)
        self.dist.barrier()
        return folder

    def _save_sharded_optimizer(self, path, optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = {"optimizer": get_optimizer_state_dict(self._stage_model, optimizer)}
        dcp.save(state, checkpoint_id=str(path))

    def _load_sharded_optimizer(self, optimizer, resumed: dict) -> None:
        """Hook after a mid-stage resume loaded the optimizer's groups: with ``fsdp``, read
        this rank's shard of its state back from the DCP folder."""
        if self._fsdp is None or self.checkpoint_dir is None:
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = _sharded_dir(self.checkpoint_dir, os.path.basename(resumed["folder"]))
        if not (path / ".metadata").is_file():
            raise TrainingError(
                f"checkpoint {resumed['folder']} was taken within a stage but its sharded "
                f"optimizer state {path} is missing (was it written by a 'ddp' or 1-process run?)"
            )
        model = self._stage_model
        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=str(path))
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        optimizer.zero_grad(set_to_none=True)  # get_optimizer_state_dict left zero grads

    # -- per stage ------------------------------------------------------------------------------

    def _wrap_stage(self, rack: nn.Module, groups: list[dict]) -> list[dict]:
        """Wrap the stage's trainable part for the strategy; returns the optimizer groups (on
        the sharded parameters with ``fsdp``)."""
        if self.dist is None:
            return groups
        base = super()._forward_loss
        if self.dist.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            cuda = self.device.type == "cuda"
            self._stage_model = DistributedDataParallel(
                _StageForward(rack, base),
                device_ids=[self.device] if cuda else None,
                forward_sync_buffers=False,  # buffers (RoPE tables, quantized bytes) never change
            )
            return groups
        return self._wrap_fsdp(rack, groups, base)

    def _wrap_fsdp(self, rack: nn.Module, groups: list[dict], base) -> list[dict]:
        from torch.distributed.fsdp import fully_shard

        trainable = {id(p) for g in groups for p in g["params"] if p.requires_grad}
        names = {id(p): n for n, p in rack.named_parameters(remove_duplicate=False)}
        # The twin shares every frozen tensor with the rack (replicated, never sharded); only
        # the trainable parameters are copied, sharded, and gathered back at the stage's end.
        memo: dict[int, Any] = {id(rack.config): rack.config}
        for p in rack.parameters():
            if id(p) not in trainable:
                memo[id(p)] = p
        for b in rack.buffers():
            memo[id(b)] = b
        twin = copy.deepcopy(rack, memo)
        frozen = {p for p in twin.parameters() if not p.requires_grad}
        for stack in twin.stacks:
            for block in getattr(stack, "blocks", []):
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, ignored_params=frozen & set(block.parameters()))
        root = fully_shard(_StageForward(twin, base), ignored_params=frozen)
        twin_params = dict(twin.named_parameters(remove_duplicate=False))
        out = []
        for g in groups:
            g = dict(g)
            g["params"] = [twin_params[names[id(p)]] for p in g["params"] if p.requires_grad]
            out.append(g)
        pairs = [
            (p, twin_params[names[id(p)]]) for g in groups for p in g["params"] if p.requires_grad
        ]
        self._stage_model = root
        self._fsdp = {"pairs": pairs}
        return out

    def _sync_trained_weights(self) -> None:
        """With ``fsdp``: gather the trained (sharded) parameters into the rack (collective)."""
        if self._fsdp is None:
            return
        with torch.no_grad():
            for orig, sharded in self._fsdp["pairs"]:
                full = sharded.full_tensor() if hasattr(sharded, "full_tensor") else sharded
                orig.copy_(full.to(orig.device, orig.dtype))

    def _unwrap_stage(self) -> None:
        self._sync_trained_weights()
        self._stage_model = None
        self._fsdp = None

    def evaluate(self, rack, loader, ratio: float, max_batches: int = 50) -> float:
        self._sync_trained_weights()
        return super().evaluate(rack, loader, ratio, max_batches)

    # -- per step -------------------------------------------------------------------------------

    def _forward_loss(self, rack, m: dict) -> Tensor:
        if self._stage_model is not None:
            return self._stage_model(m)
        return super()._forward_loss(rack, m)

    def _no_sync(self, skip: bool):
        """Within a step, every micro-batch but the last skips the gradient collective."""
        model = self._stage_model
        if model is None or not skip:
            return contextlib.nullcontext()
        if hasattr(model, "no_sync"):
            return model.no_sync()
        return _fsdp_no_sync(model)

    @property
    def _loss_scale(self) -> float:
        """The collectives average over ranks; the weights are shares of the global tokens."""
        return 1.0 if self.dist is None else float(self.dist.world_size)

    def _global_sum(self, value: float) -> float:
        return value if self.dist is None else self.dist.all_reduce_sum(value)


class _GroupsOnly:
    """An optimizer's param groups without its (sharded) state, for the checkpoint's JSON."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return {"state": {}, "param_groups": self.optimizer.state_dict()["param_groups"]}


def _sharded_dir(directory, name: str):
    from pathlib import Path

    return Path(directory) / "sharded" / name


def _prune_sharded(directory) -> None:
    """Drop sharded optimizer folders whose checkpoint was pruned."""
    import shutil

    from stackwise.training.checkpoint import checkpoint_folders

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


# ---- a whole run ---------------------------------------------------------------------------------


def report_rank_error(exc: BaseException, rank: int | None = None) -> None:
    """Print ``rank N: <error>`` (and the traceback) to stderr."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"{tb}rank {rank}: {type(exc).__name__}: {exc}\n")
    sys.stderr.flush()


def train_distributed(
    config,
    dataloader_factory: Callable[[DistributedContext], Any],
    *,
    checkpoint_dir: str | None = None,
    target_stacks: int | None = None,
    eval_loader_factory: Callable[[DistributedContext], Any] | None = None,
    resume: bool = False,
    building_mode: str | None = None,
    tokenizer_ids: dict[str, int] | None = None,
    callbacks: list | None = None,
) -> dict[str, Any]:
    """One rank's share of a data-parallel progressive run (or the whole run in one process).

    ``dataloader_factory(ctx)`` returns the global batches (sliced per rank here) or a per-rank
    loader (``create_data_loaders(config, distributed=ctx)``). Returns ``train_rack``'s result
    plus ``"context"``, ``"builder"`` and ``"trainer"``. An error on this rank is printed as
    ``rank N: <error>`` to stderr and re-raised (the process exits non-zero; torchrun stops the
    other ranks)."""
    from stackwise.training.progressive import ProgressiveTrainer
    from stackwise.training.rack_builder import ProgressiveRackBuilder

    rank = int(os.environ.get("RANK", "0"))
    ctx = None
    try:
        ctx = DistributedContext.from_env(config)
        rank = ctx.rank
        mode = building_mode or config.training.progressive.building_mode
        builder = ProgressiveRackBuilder(config, building_mode=mode)
        trainer = ProgressiveTrainer(
            config,
            tokenizer_ids=tokenizer_ids,
            checkpoint_dir=checkpoint_dir,
            callbacks=callbacks,
            distributed=ctx,
        )
        loader = dataloader_factory(ctx)
        eval_loader = None if eval_loader_factory is None else eval_loader_factory(ctx)
        results = trainer.train_rack(
            builder, loader, target_stacks=target_stacks, eval_loader=eval_loader, resume=resume
        )
        ctx.barrier()
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt):
            report_rank_error(exc, rank)
        raise
    results["context"] = ctx
    results["builder"] = builder
    results["trainer"] = trainer
    return results


__all__ = [
    "DistributedContext",
    "DistributedTrainerMixin",
    "active_context",
    "report_rank_error",
    "train_distributed",
]
