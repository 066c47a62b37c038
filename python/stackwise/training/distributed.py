"""Where a process stands in a data-parallel job on ``torch.distributed``
(``training.distributed``): :class:`DistributedContext`.

Launch W processes with ``torchrun --nproc_per_node=W``; in each,
``DistributedContext.from_env(config)`` reads torchrun's environment and joins the process group
(nccl on GPUs, gloo on CPU). A :class:`~stackwise.training.progressive.ProgressiveTrainer` built
under torchrun joins the job itself. :class:`~stackwise.training.parallel.DataParallel` is what
the training loop does with the context (sharded batches, wrapped gradients, rank-0 checkpoints);
:func:`stackwise.run.launch.train_distributed` runs a whole job.

- **Data**: ``train_rack`` takes the *global* batches (``training.batch_size`` = B); rank r reads
  rows ``[r::W]`` of each (:class:`~stackwise.data.sharding.ShardedBatches`), keeping global
  sample ids, so masks match the one-process run. A loader that already reads per-rank shares
  (``create_data_loaders(config, distributed=ctx)``) is used as it is.
- **Gradients**: ``ddp`` (DistributedDataParallel over the stage's trainable part) or ``fsdp``
  (FSDP2 ``fully_shard`` of the trainable part; the frozen, possibly quantized trunk is
  replicated). The update equals the one-process update with batch B; the logged loss is the
  global one.
- **Cache**: each rank caches its own boundary activations in ``<spill_dir>/rank<r>``.
- **Checkpoints, callbacks**: rank 0 writes (the others wait at a barrier) and only rank 0 calls
  callbacks. With ``fsdp`` a mid-stage checkpoint keeps the sharded optimizer state under
  ``<dir>/sharded/<checkpoint>/`` (``torch.distributed.checkpoint``), so a resume needs the same
  world size and strategy.
- **Errors**: :func:`report_rank_error` prints ``rank N: <error>`` to stderr.

With ``WORLD_SIZE`` unset or 1, nothing of this is active and training is unchanged.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

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


# ---- errors ------------------------------------------------------------------------------------


def report_rank_error(exc: BaseException, rank: int | None = None) -> None:
    """Print ``rank N: <error>`` (and the traceback) to stderr."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"{tb}rank {rank}: {type(exc).__name__}: {exc}\n")
    sys.stderr.flush()


__all__ = ["DistributedContext", "active_context", "report_rank_error"]
