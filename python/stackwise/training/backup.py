"""Disk backups of full-precision block weights, taken before a block is converted to a lower
storage precision (fusion training's frozen or QLoRA backbone), so the exact weights can be
brought back later.

    path = save_full_precision_weights(directory, {0: block0.state_dict()}, "fp16", run_id="x")
    restored = restore_full_precision_weights(directory, block_indices=[0], precision="fp16")
    block0.load_state_dict(restored[0])

Layout of ``directory`` (by default ``<checkpointing.dir>/backups/<run_id>/``, see
:func:`backup_directory`): one ``block-NNNN.safetensors`` per block, its floating-point tensors
stored in the backup precision (fp32 / fp16 / bf16; other tensors as they are), and
``metadata.json``: format version, run id, precision, block indices and, per block, its file, the
file's SHA-256, and each tensor's name, shape, original dtype and stored dtype. Every file is
written atomically; a block file is written before the metadata that names it, so a crash leaves
the previous backup readable. Saving more blocks later adds them to the same metadata.

Restoring checks everything and raises :class:`TrainingError` naming what is missing (the run
folder, ``metadata.json``, a block file, a block index) or corrupt (a checksum mismatch, a file
safetensors cannot read, a tensor whose name, shape or dtype disagrees with the metadata).
Restored tensors take their original dtype again (values rounded through the backup precision).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from stackwise import precision as _precision
from stackwise._io import atomic_write_bytes, atomic_write_text, sha256_file
from stackwise.exceptions import TrainingError

METADATA = "metadata.json"
_FORMAT = "stackwise-weight-backup"
_VERSION = 1


def canonical_backup_precision(precision: str) -> str:
    """``fp32``, ``fp16`` or ``bf16`` (or an alias, :data:`stackwise.precision.FLOAT`), else
    TrainingError."""
    return _precision.canonical(
        precision, _precision.FLOAT, key="cache_precision", error=TrainingError
    )


def new_run_id() -> str:
    """A fresh run id: UTC time and 6 random hex digits, e.g. ``run-20240501-120000-a1b2c3``."""
    return f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def backup_directory(config, run_id: str, root: str | os.PathLike[str] | None = None) -> Path:
    """``<root>/<run_id>``; ``root`` defaults to ``<training.checkpointing.dir>/backups``."""
    if not run_id or "/" in run_id or run_id in (".", ".."):
        raise TrainingError(f"run_id {run_id!r} is not a usable folder name")
    base = Path(root) if root is not None else Path(config.training.checkpointing.dir) / "backups"
    return base / run_id


def _block_file(idx: int) -> str:
    return f"block-{idx:04d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_metadata(directory: Path) -> dict:
    path = directory / METADATA
    if not path.is_file():
        raise TrainingError(f"weight backup {directory} has no {METADATA} ({path} is missing)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{path} is corrupt: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise TrainingError(f"{path} is not the metadata of a stackwise weight backup")
    if meta.get("version") != _VERSION:
        raise TrainingError(f"{path} has version {meta.get('version')!r}, expected {_VERSION}")
    return meta


def save_full_precision_weights(
    directory: str | os.PathLike[str],
    state_dicts: Mapping[int, Mapping[str, Tensor]],
    precision: str,
    run_id: str,
) -> Path:
    """Write one safetensors file per block of ``state_dicts`` (``{block index: state dict}``)
    in ``precision`` and update ``metadata.json``; returns the directory."""
    from safetensors.torch import save

    prec = canonical_backup_precision(precision)
    dtype = _precision.dtype_of(prec)
    out = Path(directory)
    meta = (
        _read_metadata(out)
        if (out / METADATA).exists()
        else {"format": _FORMAT, "version": _VERSION, "run_id": run_id, "blocks": {}}
    )
    if meta.get("run_id") != run_id:
        raise TrainingError(
            f"{out / METADATA} belongs to run {meta.get('run_id')!r}, not {run_id!r}"
        )
    if not state_dicts:
        raise TrainingError("nothing to back up: no blocks given")
    for idx, state in state_dicts.items():
        if not isinstance(idx, int) or idx < 0:
            raise TrainingError(f"block index must be an integer >= 0, got {idx!r}")
        tensors, described = {}, {}
        for name, t in state.items():
            t = t.detach()
            stored = t.to(dtype) if t.is_floating_point() else t
            tensors[name] = stored.contiguous().cpu()
            described[name] = {
                "shape": list(t.shape),
                "dtype": _dtype_name(t.dtype),
                "stored_dtype": _dtype_name(stored.dtype),
            }
        path = atomic_write_bytes(out / _block_file(idx), save(tensors))
        meta["blocks"][str(idx)] = {
            "file": path.name,
            "precision": prec,
            "sha256": sha256_file(path),
            "tensors": described,
        }
    precisions = {b["precision"] for b in meta["blocks"].values()}
    meta["precision"] = precisions.pop() if len(precisions) == 1 else "mixed"
    meta["block_indices"] = sorted(int(k) for k in meta["blocks"])
    atomic_write_text(out / METADATA, json.dumps(meta, indent=2))
    return out


def restore_full_precision_weights(
    directory: str | os.PathLike[str],
    block_indices: Iterable[int] | None = None,
    precision: str | None = None,
) -> dict[int, dict[str, Tensor]]:
    """``{block index: state dict}`` read back from a backup (every block when
    ``block_indices`` is None); ``precision``, when given, must be the one the blocks were
    stored in. Raises :class:`TrainingError` naming anything missing or corrupt."""
    from safetensors.torch import load

    src = Path(directory)
    if not src.is_dir():
        raise TrainingError(f"no weight backup at {src} (the folder does not exist)")
    meta = _read_metadata(src)
    blocks = meta.get("blocks", {})
    wanted = sorted(int(k) for k in blocks) if block_indices is None else list(block_indices)
    prec = None if precision is None else canonical_backup_precision(precision)
    restored: dict[int, dict[str, Tensor]] = {}
    for idx in wanted:
        entry = blocks.get(str(idx))
        if entry is None:
            raise TrainingError(
                f"block {idx} is not in the weight backup {src} (it holds blocks "
                f"{sorted(int(k) for k in blocks)})"
            )
        if prec is not None and entry["precision"] != prec:
            raise TrainingError(
                f"block {idx} of the weight backup {src} is stored in {entry['precision']}, "
                f"not {prec}"
            )
        path = src / entry["file"]
        if not path.is_file():
            raise TrainingError(f"{path} is missing (block {idx} of the weight backup)")
        if sha256_file(path) != entry["sha256"]:
            raise TrainingError(f"{path} is corrupt (SHA-256 mismatch)")
        try:
            tensors = load(path.read_bytes())
        except Exception as exc:  # safetensors raises its own error types
            raise TrainingError(f"{path} cannot be read as safetensors: {exc}") from exc
        described = entry["tensors"]
        if set(tensors) != set(described):
            missing = sorted(set(described) - set(tensors))
            extra = sorted(set(tensors) - set(described))
            raise TrainingError(
                f"{path} does not match its metadata: missing {missing}, unexpected {extra}"
            )
        state = {}
        for name, t in tensors.items():
            d = described[name]
            if list(t.shape) != d["shape"] or _dtype_name(t.dtype) != d["stored_dtype"]:
                raise TrainingError(
                    f"{path}: tensor {name} is {_dtype_name(t.dtype)} {list(t.shape)}, the "
                    f"metadata says {d['stored_dtype']} {d['shape']}"
                )
            original = getattr(torch, str(d["dtype"]), None)
            if not isinstance(original, torch.dtype):
                raise TrainingError(f"{path}: tensor {name} has unknown dtype {d['dtype']!r}")
            state[name] = t.to(original)
        restored[idx] = state
    return restored


__all__ = [
    "backup_directory",
    "canonical_backup_precision",
    "new_run_id",
    "restore_full_precision_weights",
    "save_full_precision_weights",
]
