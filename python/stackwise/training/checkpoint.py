"""Checkpoints of progressive training: after each stage and every
``training.checkpointing.every_steps`` optimizer steps, everything needed to continue exactly.

A checkpoint is a folder ``<dir>/stage-NNN/`` (the end of stage NNN) or
``<dir>/stage-NNN-step-KKKKKK/`` (stage NNN after its step KKKKKK) holding:

- ``model.safetensors``: the rack's state dict (quantized trunk stacks as packed bytes, adapters
  and the time embedding included);
- ``optimizer.safetensors``: the stage's optimizer state tensors (empty at a stage's end, where
  the next stage starts a new optimizer);
- ``rng.safetensors``: torch's CPU (and CUDA) RNG states, numpy's, and the data loader's
  sampler generator at the points the resumed run needs (see ``ProgressiveTrainer``);
- ``builder.json``: stack order, block counts, storage precisions, how each frozen stack was
  converted and its adapters' rank;
- ``trainer.json``: per-stage history, the progress of the stage under way (losses so far,
  step, optimizer param groups, LR-scheduler state), python's ``random`` state;
- ``manifest.json``: the SHA-256 of each file.

The folder is written under a temporary name, every file fsynced, then renamed; ``<dir>/latest``
is replaced atomically only after that, so a crash leaves the previous checkpoint in force. Only
the newest ``keep_last`` checkpoints are kept. Loading checks every digest and raises
:class:`TrainingError` naming what is missing or corrupt. No file holds pickled objects.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from stackwise._io import atomic_write_bytes, atomic_write_text, sha256_file, verify_manifest
from stackwise.exceptions import CacheCorruptionError, TrainingError
from stackwise.training.optim import optimizer_state_from_tensors, optimizer_state_to_tensors

# The files every checkpoint folder holds, and the folder names.
CHECKPOINT_FILES = ("model.safetensors", "rng.safetensors", "builder.json", "trainer.json")
_VERSION = 2
CHECKPOINT_NAME = re.compile(r"^stage-(\d{3,})(?:-step-(\d{6,}))?$")


def _json_safe(data: Any) -> Any:
    return json.loads(json.dumps(data, default=float))


# ---- RNG states ---------------------------------------------------------------------------------


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Torch CPU/CUDA, numpy and python ``random`` states as ``(tensors, json_data)``."""
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    meta: dict[str, Any] = {"python": _json_safe(random.getstate())}
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the trainer
        np = None
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        tensors["numpy.keys"] = torch.from_numpy(keys.astype("int64"))
        meta["numpy"] = [kind, int(pos), int(has_gauss), float(gauss)]
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (parts missing from a checkpoint are left alone)."""
    torch.set_rng_state(tensors["cpu"])
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda][: torch.cuda.device_count()])
    if "python" in meta:
        version, state, gauss = meta["python"]
        random.setstate((version, tuple(state), gauss))
    if "numpy" in meta and "numpy.keys" in tensors:
        import numpy as np

        kind, pos, has_gauss, gauss = meta["numpy"]
        keys = tensors["numpy.keys"].numpy().astype(np.uint32)
        np.random.set_state((kind, keys, pos, has_gauss, gauss))


# ---- writing ------------------------------------------------------------------------------------


def checkpoint_folders(directory: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint folders in ``directory``, oldest first (by stage, then step; a stage's end
    after its steps)."""
    root = Path(directory)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = CHECKPOINT_NAME.match(p.name)
            if m and p.is_dir():
                step = int(m.group(2)) if m.group(2) is not None else float("inf")
                found.append(((int(m.group(1)), step), p))
    return [p for _, p in sorted(found)]


def _write_folder(root: Path, name: str, files: dict[str, bytes]) -> Path:
    """Write ``files`` into ``root/name`` atomically: a temporary folder, then a rename."""
    folder = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for fname, data in files.items():
        atomic_write_bytes(tmp / fname, data)
    manifest = {fname: sha256_file(tmp / fname) for fname in files}
    atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
    old = None
    if folder.exists():  # rewriting a checkpoint of the same name (a resumed run)
        old = root / f".old-{name}-{os.getpid()}"
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    folders = checkpoint_folders(root)
    for p in folders[: max(0, len(folders) - keep_last)]:
        if p.name != keep.name:
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class StageProgress:
    """Where a stage stood when a mid-stage checkpoint was taken: its index, the optimizer steps
    done of ``steps``, the planned rack size (``plan``, for the mask schedule), the per-step
    losses and times so far, tokens, wall and cache-fill seconds, the data position
    (:meth:`LoaderSource.position`, None when the stage reads the cache) and the optimizer and
    LR-scheduler states (``optimizer`` as a ``state_dict`` once loaded)."""

    stage: int
    step: int
    steps: int
    plan: int
    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    cache_fill_s: float = 0.0
    data: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageProgress:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ResumeState:
    """What :func:`load_checkpoint` hands the trainer besides weights and history: the folder,
    the progress of a stage under way (None at a stage's end), the global RNG states and the
    extra generator states (the data loader's, ``loader.*``)."""

    folder: str
    progress: StageProgress | None
    rng: dict[str, torch.Tensor]
    rng_meta: dict[str, Any]
    extra_rng: dict[str, torch.Tensor]


def checkpoint_name(stage: int, step: int | None = None) -> str:
    """``stage-NNN`` (a stage's end) or ``stage-NNN-step-KKKKKK`` (within a stage)."""
    return f"stage-{stage:03d}" if step is None else f"stage-{stage:03d}-step-{step:06d}"


def save_checkpoint(
    directory: str | os.PathLike[str],
    builder,
    history: list[dict[str, Any]],
    keep_last: int,
    progress: StageProgress | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    extra_rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint of ``builder``'s rack and the trainer's ``history`` and point
    ``latest`` at it; keep the newest ``keep_last``. Without ``progress``: the end of the stage
    just finished (``builder.n_stacks - 1``); with it: within stage ``progress.stage`` after its
    step ``progress.step`` (``optimizer`` and ``scheduler`` are that stage's).
    ``extra_rng``: further generator states to keep (the data loader's)."""
    from safetensors.torch import save

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if progress is None:
        name = checkpoint_name(builder.n_stacks - 1)
    else:
        name = checkpoint_name(progress.stage, progress.step)
    state = {k: v.detach().contiguous().cpu() for k, v in builder.rack.state_dict().items()}
    opt_tensors, in_progress = {}, None
    if progress is not None:
        opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer)
        in_progress = progress.to_json()
        in_progress["optimizer"] = opt_meta
        in_progress["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    rng, rng_meta = capture_rng_state()
    for key, value in (extra_rng or {}).items():
        rng[f"extra.{key}"] = value
    builder_meta = {
        "version": _VERSION,
        "building_mode": builder.building_mode,
        "blocks": [len(s) for s in builder.rack.stacks],
        "precisions": builder.precisions,
        "strategies": builder.strategies,
        "adapter_ranks": builder.adapter_ranks,
        "layer_seed": builder._layer_seed,
    }
    trainer_meta = {
        "version": _VERSION,
        "history": history,
        "in_progress": in_progress,
        "rng": rng_meta,
    }
    files = {
        "model.safetensors": save(state),
        "optimizer.safetensors": save(opt_tensors),
        "rng.safetensors": save(rng),
        "builder.json": json.dumps(builder_meta, indent=2).encode(),
        "trainer.json": json.dumps(_json_safe(trainer_meta), indent=2).encode(),
    }
    folder = _write_folder(root, name, files)
    atomic_write_text(root / "latest", folder.name + "\n")
    _prune(root, max(1, keep_last), folder)
    return folder


# ---- reading ------------------------------------------------------------------------------------


def has_checkpoint(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / "latest").is_file()


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path:
    root = Path(directory)
    pointer = root / "latest"
    if not pointer.is_file():
        raise TrainingError(f"no checkpoint to resume in {root} (missing {pointer.name})")
    folder = root / pointer.read_text().strip()
    if not folder.is_dir():
        raise TrainingError(f"{pointer} names {folder.name}, which does not exist")
    return folder


def _verified(folder: Path) -> dict[str, str]:
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise TrainingError(f"checkpoint {folder} is incomplete (no manifest.json)")
    try:  # a JSON object of relative names inside the folder -> SHA-256 (hashed just below)
        manifest = verify_manifest(folder, digests=False)
    except CacheCorruptionError as exc:
        raise TrainingError(f"checkpoint {folder} cannot be trusted: {exc}") from None
    for name in sorted(set(manifest) | set(CHECKPOINT_FILES)):
        path = folder / name
        if not path.is_file():
            raise TrainingError(f"checkpoint {folder} is missing {name}")
        if sha256_file(path) != manifest.get(name):
            raise TrainingError(f"checkpoint file {path} is corrupt (SHA-256 mismatch)")
    return manifest


def checkpoint_building_mode(directory: str | os.PathLike[str]) -> str:
    """The building mode (append / prepend) of the newest checkpoint in ``directory``."""
    folder = latest_checkpoint(directory)
    _verified(folder)
    return json.loads((folder / "builder.json").read_text())["building_mode"]


def load_checkpoint(
    directory: str | os.PathLike[str], builder, qlora_cfg
) -> tuple[list[dict[str, Any]], ResumeState]:
    """Restore the newest checkpoint of ``directory`` into an empty ``builder`` (no stacks yet):
    stacks, conversions, weights; restore the global RNG states. Returns the trainer's history
    and the :class:`ResumeState` (the progress of a stage under way, the generator states).
    Every file's digest is checked first; anything missing, corrupt or not fitting the
    configuration raises :class:`TrainingError` naming it."""
    from safetensors.torch import load_file

    folder = latest_checkpoint(directory)
    manifest = _verified(folder)
    if builder.n_stacks != 0:
        raise TrainingError(
            f"resuming needs an empty rack builder, this one has {builder.n_stacks} stacks"
        )
    meta = json.loads((folder / "builder.json").read_text())
    if meta["building_mode"] != builder.building_mode:
        raise TrainingError(
            f"checkpoint {folder} was built in {meta['building_mode']!r} mode, the builder is "
            f"{builder.building_mode!r}"
        )
    for n_blocks, precision in zip(meta["blocks"], meta["precisions"], strict=True):
        builder.append_stack(n_blocks=n_blocks, precision=precision)
    ranks = meta.get("adapter_ranks") or [None] * len(meta["strategies"])
    for i, (strategy, ra) in enumerate(zip(meta["strategies"], ranks, strict=True)):
        if strategy:
            rank, alpha = (ra[0], ra[1]) if ra else (None, None)
            builder.freeze_stack(i, strategy, qlora_cfg, rank=rank, alpha=alpha)
    builder._layer_seed = meta["layer_seed"]
    try:
        builder.rack.load_state_dict(load_file(str(folder / "model.safetensors")))
    except RuntimeError as exc:
        raise TrainingError(f"checkpoint {folder} does not fit this configuration: {exc}") from exc
    state = json.loads((folder / "trainer.json").read_text())
    rng = load_file(str(folder / "rng.safetensors"))
    rng_meta = state.get("rng", {})
    in_progress = state.get("in_progress")
    progress = None
    if in_progress is not None:
        if "optimizer.safetensors" not in manifest:
            raise TrainingError(f"checkpoint {folder} is missing optimizer.safetensors")
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
        progress = StageProgress.from_json(in_progress)
        progress.optimizer = optimizer_state_from_tensors(opt_tensors, in_progress["optimizer"])
    resume = ResumeState(
        folder=str(folder),
        progress=progress,
        rng={k: v for k, v in rng.items() if not k.startswith("extra.")},
        rng_meta=rng_meta,
        extra_rng={k[len("extra.") :]: v for k, v in rng.items() if k.startswith("extra.")},
    )
    restore_rng_state(resume.rng, rng_meta)
    return state["history"], resume


__all__ = [
    "CHECKPOINT_FILES",
    "CHECKPOINT_NAME",
    "ResumeState",
    "StageProgress",
    "capture_rng_state",
    "checkpoint_building_mode",
    "checkpoint_folders",
    "checkpoint_name",
    "has_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]
