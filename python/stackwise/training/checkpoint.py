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
from pathlib import Path
from typing import Any

import torch

from stackwise._io import atomic_write_bytes, atomic_write_text, sha256_file, verify_manifest
from stackwise.exceptions import CacheCorruptionError, TrainingError
from stackwise.training.optim import optimizer_state_from_tensors, optimizer_state_to_tensors

_FILES_V1 = ("model.safetensors", "rng.safetensors", "builder.json", "trainer.json")
_VERSION = 2
_NAME = re.compile(r"^stage-(\d{3,})(?:-step-(\d{6,}))?$")


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
            m = _NAME.match(p.name)
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


def save_checkpoint(
    directory: str | os.PathLike[str],
    trainer,
    builder,
    progress: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    extra_rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint and point ``latest`` at it. Without ``progress``: the end of the stage
    just finished (``builder.n_stacks - 1``); with it: the stage ``progress["stage"]`` after its
    step ``progress["step"]`` (``optimizer`` and ``scheduler`` are that stage's).
    ``extra_rng``: further generator states to keep (the data loader's)."""
    from safetensors.torch import save

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if progress is None:
        name = f"stage-{builder.n_stacks - 1:03d}"
    else:
        name = f"stage-{progress['stage']:03d}-step-{progress['step']:06d}"
    state = {k: v.detach().contiguous().cpu() for k, v in builder.rack.state_dict().items()}
    opt_tensors, in_progress = {}, None
    if progress is not None:
        opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer)
        in_progress = dict(progress)
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
        "history": trainer.history,
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
    keep_last = trainer.config.training.checkpointing.keep_last
    _prune(root, max(1, keep_last), folder)
    return folder


def save_stage_checkpoint(directory: str | os.PathLike[str], trainer, builder) -> Path:
    """Write the checkpoint of the stage just finished and point ``latest`` at it."""
    return save_checkpoint(directory, trainer, builder)


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
    for name in sorted(set(manifest) | set(_FILES_V1)):
        path = folder / name
        if not path.is_file():
            raise TrainingError(f"checkpoint {folder} is missing {name}")
        if sha256_file(path) != manifest.get(name):
            raise TrainingError(f"checkpoint file {path} is corrupt (SHA-256 mismatch)")
    return manifest


def load_checkpoint_into(directory: str | os.PathLike[str], trainer, builder) -> Path:
    """Restore the newest checkpoint of ``directory`` into an empty ``builder`` (no stacks yet)
    and a fresh ``trainer``: stacks, weights, history, RNG states; the progress of a stage under
    way is left in ``trainer._resume`` for ``train_rack`` to pick up. Returns the folder."""
    from safetensors.torch import load_file

    folder = latest_checkpoint(directory)
    manifest = _verified(folder)
    if builder.n_stacks != 0:
        raise TrainingError(
            f"resuming needs an empty rack builder, this one has {builder.n_stacks} stacks"
        )
    if trainer.history:
        raise TrainingError("resuming needs a trainer that has not trained yet")
    meta = json.loads((folder / "builder.json").read_text())
    if meta["building_mode"] != builder.building_mode:
        raise TrainingError(
            f"checkpoint {folder} was built in {meta['building_mode']!r} mode, the builder is "
            f"{builder.building_mode!r}"
        )
    for n_blocks, precision in zip(meta["blocks"], meta["precisions"], strict=True):
        builder.append_stack(n_blocks=n_blocks, precision=precision)
    ranks = meta.get("adapter_ranks") or [None] * len(meta["strategies"])
    qlora = trainer.config.training.qlora
    for i, (strategy, ra) in enumerate(zip(meta["strategies"], ranks, strict=True)):
        if strategy:
            rank, alpha = (ra[0], ra[1]) if ra else (None, None)
            builder.freeze_stack(i, strategy, qlora, rank=rank, alpha=alpha)
    builder._layer_seed = meta["layer_seed"]
    try:
        builder.rack.load_state_dict(load_file(str(folder / "model.safetensors")))
    except RuntimeError as exc:
        raise TrainingError(f"checkpoint {folder} does not fit this configuration: {exc}") from exc
    state = json.loads((folder / "trainer.json").read_text())
    rng = load_file(str(folder / "rng.safetensors"))
    rng_meta = state.get("rng", {})
    trainer.history = state["history"]
    in_progress = state.get("in_progress")
    if in_progress is not None:
        if "optimizer.safetensors" not in manifest:
            raise TrainingError(f"checkpoint {folder} is missing optimizer.safetensors")
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
        in_progress["optimizer"] = optimizer_state_from_tensors(
            opt_tensors, in_progress["optimizer"]
        )
    trainer._resume = {
        "folder": str(folder),
        "in_progress": in_progress,
        "rng": {k: v for k, v in rng.items() if not k.startswith("extra.")},
        "rng_meta": rng_meta,
        "extra_rng": {k[len("extra.") :]: v for k, v in rng.items() if k.startswith("extra.")},
    }
    restore_rng_state(trainer._resume["rng"], rng_meta)
    trainer._seeded = True  # the RNG continues from the checkpoint, not from training.seed
    return folder


def load_stage_checkpoint(directory: str | os.PathLike[str], config, **trainer_kwargs):
    """``(trainer, builder)`` restored from the newest checkpoint in ``directory``."""
    from stackwise.training.progressive import ProgressiveTrainer
    from stackwise.training.rack_builder import ProgressiveRackBuilder

    folder = latest_checkpoint(directory)
    _verified(folder)  # before reading builder.json for the building mode
    mode = json.loads((folder / "builder.json").read_text())["building_mode"]
    builder = ProgressiveRackBuilder(config, building_mode=mode)
    trainer = ProgressiveTrainer(config, checkpoint_dir=str(directory), **trainer_kwargs)
    load_checkpoint_into(directory, trainer, builder)
    return trainer, builder


__all__ = [
    "capture_rng_state",
    "checkpoint_folders",
    "has_checkpoint",
    "latest_checkpoint",
    "load_checkpoint_into",
    "load_stage_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "save_stage_checkpoint",
]
