"""Atomic file writes (docs/DESIGN.md §6): write a temporary file beside the target, fsync,
rename, so a reader sees the old file or the new one, never a partial one."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; creates the parent folder. Returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_HEX = frozenset("0123456789abcdef")


def verify_manifest(
    folder: str | os.PathLike[str], required: tuple[str, ...] = (), *, digests: bool = True
) -> dict[str, str]:
    """Read and check ``folder/manifest.json``, the SHA-256 list of a saved rack or checkpoint.

    The manifest must be a JSON object mapping file names to 64-digit hex SHA-256 digests and
    list every name in ``required``. Each name must be a relative path without ``..`` naming a
    regular file inside ``folder`` (after following links), so a manifest cannot point the
    reader at ``/dev/zero`` or at another folder's files. With ``digests`` every file is hashed
    and compared. Raises :class:`CacheCorruptionError` naming the manifest or the file; returns
    the manifest.
    """
    import json
    import stat

    from stackwise.exceptions import CacheCorruptionError

    root = Path(folder)
    path = root / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheCorruptionError("missing: cannot verify the folder", str(path)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheCorruptionError(f"not JSON ({exc})", str(path)) from None
    if not isinstance(manifest, dict):
        raise CacheCorruptionError(
            f"must be a JSON object of file name -> SHA-256, got {type(manifest).__name__}",
            str(path),
        )
    missing = [name for name in required if name not in manifest]
    if missing:
        raise CacheCorruptionError(
            f"does not list {missing}: those files are unverified", str(path)
        )
    base = root.resolve()
    targets = {}
    for name, digest in manifest.items():  # every entry is checked before any file is read
        rel = Path(name)
        if not name or rel.is_absolute() or ".." in rel.parts:
            raise CacheCorruptionError(
                f"lists {name!r}: entries must be relative paths inside the folder", str(path)
            )
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX):
            raise CacheCorruptionError(f"the digest of {name!r} is not a SHA-256", str(path))
        target = (root / rel).resolve()
        if not target.is_relative_to(base):
            raise CacheCorruptionError(f"lists {name!r}, which leads outside {root}", str(path))
        try:
            mode = target.stat().st_mode
        except FileNotFoundError:
            raise CacheCorruptionError(
                "listed in the manifest but missing", str(root / rel)
            ) from None
        if not stat.S_ISREG(mode):
            raise CacheCorruptionError(
                "listed in the manifest but not a regular file", str(root / rel)
            )
        targets[name] = target
    if digests:
        for name, target in targets.items():
            if sha256_file(target) != manifest[name]:
                raise CacheCorruptionError("checksum mismatch (SHA-256)", str(root / name))
    return manifest
