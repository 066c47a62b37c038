"""Stage checkpoints of progressive training: after each stage, everything needed to continue.

A checkpoint folder ``<dir>/stage-NNN/`` holds ``model.safetensors`` (the rack's state dict,
quantized trunk stacks as packed bytes, adapters included), ``rng.safetensors`` (torch's CPU RNG
state, which initialises the next stack), ``builder.json`` (stack order, block counts, storage
precisions, how each frozen stack was converted), ``trainer.json`` (per-stage history) and
``manifest.json`` (SHA-256 of each file). ``<dir>/latest`` names the newest stage folder; it is
replaced atomically only after the folder is complete, so a crash leaves the previous checkpoint
in force. Loading checks every digest and raises :class:`TrainingError` naming what is missing
or corrupt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from stackwise._io import atomic_write_bytes, atomic_write_text, sha256_file
from stackwise.exceptions import TrainingError

_FILES = ("model.safetensors", "rng.safetensors", "builder.json", "trainer.json")
_VERSION = 1


def _json_safe(history: list[dict]) -> list[dict]:
    return json.loads(json.dumps(history, default=float))


def save_stage_checkpoint(directory: str | os.PathLike[str], trainer, builder) -> Path:
    """Write the checkpoint of the stage just finished and point ``latest`` at it."""
    from safetensors.torch import save

    root = Path(directory)
    stage = builder.n_stacks - 1
    folder = root / f"stage-{stage:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in builder.rack.state_dict().items()}
    atomic_write_bytes(folder / "model.safetensors", save(state))
    atomic_write_bytes(folder / "rng.safetensors", save({"cpu": torch.get_rng_state()}))
    atomic_write_text(
        folder / "builder.json",
        json.dumps(
            {
                "version": _VERSION,
                "building_mode": builder.building_mode,
                "blocks": [len(s) for s in builder.rack.stacks],
                "precisions": builder.precisions,
                "strategies": builder.strategies,
                "layer_seed": builder._layer_seed,
            },
            indent=2,
        ),
    )
    atomic_write_text(
        folder / "trainer.json",
        json.dumps({"version": _VERSION, "history": _json_safe(trainer.history)}, indent=2),
    )
    manifest = {name: sha256_file(folder / name) for name in _FILES}
    atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=2))
    atomic_write_text(root / "latest", folder.name + "\n")
    return folder


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path:
    root = Path(directory)
    pointer = root / "latest"
    if not pointer.is_file():
        raise TrainingError(f"no checkpoint to resume in {root} (missing {pointer.name})")
    folder = root / pointer.read_text().strip()
    if not folder.is_dir():
        raise TrainingError(f"{pointer} names {folder.name}, which does not exist")
    return folder


def load_stage_checkpoint(directory: str | os.PathLike[str], config):
    """``(trainer, builder)`` restored from the newest checkpoint in ``directory``."""
    from safetensors.torch import load_file

    from stackwise.training.progressive import ProgressiveTrainer
    from stackwise.training.rack_builder import ProgressiveRackBuilder

    folder = latest_checkpoint(directory)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise TrainingError(f"checkpoint {folder} is incomplete (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    for name in _FILES:
        path = folder / name
        if not path.is_file():
            raise TrainingError(f"checkpoint {folder} is missing {name}")
        if sha256_file(path) != manifest.get(name):
            raise TrainingError(f"checkpoint file {path} is corrupt (SHA-256 mismatch)")
    meta = json.loads((folder / "builder.json").read_text())
    builder = ProgressiveRackBuilder(config, building_mode=meta["building_mode"])
    for n_blocks, precision in zip(meta["blocks"], meta["precisions"], strict=True):
        builder.append_stack(n_blocks=n_blocks, precision=precision)
    for i, strategy in enumerate(meta["strategies"]):
        if strategy:
            builder.freeze_stack(i, strategy, config.training.qlora)
    builder._layer_seed = meta["layer_seed"]
    try:
        builder.rack.load_state_dict(load_file(str(folder / "model.safetensors")))
    except RuntimeError as exc:
        raise TrainingError(f"checkpoint {folder} does not fit this configuration: {exc}") from exc
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["cpu"])
    trainer = ProgressiveTrainer(config, checkpoint_dir=directory)
    trainer.history = json.loads((folder / "trainer.json").read_text())["history"]
    return trainer, builder
