"""Which checkpoint of a run directory a resumed run continues from, checked before anything
loads it, and how far that checkpoint got.

``<run>/checkpoints/latest`` names the checkpoint in force (training/checkpoint.py writes it
after the folder it names is complete). Here it must name one folder directly inside
``checkpoints/`` (``stage-NNN`` or ``stage-NNN-step-KKKKKK``, no other path, no link leading
elsewhere); anything else is refused, so a run never continues from another run's weights.

When ``latest`` is missing but checkpoint folders are there (deleted by hand, or a crash between
a folder's rename and the pointer's write), ``--resume`` continues from the newest folder whose
manifest verifies (every file listed, SHA-256 matching), rewrites ``latest`` to name it and says
so; folders that fail are named in that note. It never restarts from step 0 while a good
checkpoint exists. ``stackwise eval`` never rewrites the pointer: it refuses and names the
folder to restore.
"""

from __future__ import annotations

import json
from pathlib import Path

from stackwise._io import atomic_write_text, verify_manifest
from stackwise.exceptions import StackWiseError, TrainingError
from stackwise.training.checkpoint import CHECKPOINT_FILES, CHECKPOINT_NAME


def _inside(folder: Path, root: Path) -> bool:
    return folder.resolve().parent == root.resolve()


def pointed_checkpoint(checkpoints: Path) -> Path | None:
    """The folder ``checkpoints/latest`` names (None without ``latest``); raises
    :class:`TrainingError` when the pointer names anything but a folder of ``checkpoints``."""
    pointer = checkpoints / "latest"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TrainingError(f"{pointer} cannot be read as a folder name: {exc}") from None
    if not CHECKPOINT_NAME.match(name):
        raise TrainingError(
            f"{pointer} names {name[:80]!r}; it must name a checkpoint folder of {checkpoints} "
            "(stage-NNN or stage-NNN-step-KKKKKK), not a path"
        )
    folder = checkpoints / name
    if not folder.is_dir():
        raise TrainingError(f"{pointer} names {name}, which does not exist")
    if not _inside(folder, checkpoints):
        raise TrainingError(f"{pointer} names {name}, a link leading outside {checkpoints}")
    return folder


def newest_verified(checkpoints: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint folder whose manifest verifies, and a line for each newer one
    that does not."""
    from stackwise.training.checkpoint import checkpoint_folders

    rejected = []
    for folder in reversed(checkpoint_folders(checkpoints)):
        if not _inside(folder, checkpoints):
            rejected.append(f"{folder.name} (a link leading outside)")
            continue
        try:
            verify_manifest(folder, CHECKPOINT_FILES)
        except StackWiseError as exc:
            rejected.append(f"{folder.name} ({exc})")
            continue
        return folder, rejected
    return None, rejected


def resume_checkpoint(checkpoints: Path, notes: list[str], *, repair: bool) -> Path | None:
    """The checkpoint a resumed run continues from, or None when there is none (the run starts
    from step 0, and a note says so). Without ``latest``: see the module docstring; ``repair``
    rewrites the pointer, else :class:`TrainingError` names the folder to restore."""
    folder = pointed_checkpoint(checkpoints)
    if folder is not None:
        verify_manifest(folder, CHECKPOINT_FILES, digests=False)  # paths; the loader hashes
        return folder
    newest, rejected = newest_verified(checkpoints)
    skipped = f"; skipped {', '.join(rejected)}" if rejected else ""
    if newest is None:
        if rejected:
            raise TrainingError(
                f"{checkpoints / 'latest'} is missing and no checkpoint folder verifies{skipped}"
            )
        notes.append("no checkpoint yet: training starts from step 0")
        return None
    if not repair:
        raise TrainingError(
            f"{checkpoints / 'latest'} is missing; the newest checkpoint that verifies is "
            f"{newest.name}: restore the pointer (echo {newest.name} > {checkpoints / 'latest'}) "
            "or resume the run"
        )
    atomic_write_text(checkpoints / "latest", newest.name + "\n")
    notes.append(
        f"checkpoints/latest was missing: continuing from {newest.name}, the newest checkpoint "
        f"whose checksums verify (latest now names it){skipped}"
    )
    return newest


def checkpoint_global_step(folder: Path | None) -> int:
    """Optimizer steps a checkpoint has taken over the whole run: the finished stages' steps
    plus, for a checkpoint within a stage, the steps of that stage so far (0 without one)."""
    if folder is None:
        return 0
    path = folder / "trainer.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        done = sum(int(h["steps"]) for h in state["history"])
        in_progress = state.get("in_progress")
        return done + (int(in_progress["step"]) if in_progress else 0)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(
            f"{path} does not say how far the checkpoint got ({type(exc).__name__}: {exc})"
        ) from None
