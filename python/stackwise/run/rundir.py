"""The run directory of ``stackwise train``: one folder per run, holding everything it wrote.

    runs/<config-stem>/
      config.yaml        the resolved configuration (overrides applied, validated)
      run.json           tokenizer, corpus, command line, status (running / finished / failed)
      metrics.jsonl      one JSON object per logged step, evaluation and stage (run/metrics.py)
      train.log          the plain progress lines, and the traceback of a failure
      tensorboard/       TensorBoard events (the scalars of metrics.jsonl)
      checkpoints/       stage checkpoints (training/checkpoint.py), for --resume
      rack/              the final rack (model.safetensors, config.yaml, manifest.json)
      plots/loss.png     train and validation loss over global steps, stage boundaries marked
      plots/memory.png   peak memory per stage
      summary.json       final figures; summary.md the same for people
      .lock              held (flock) by the stackwise train process using the folder

An existing folder is refused unless the run resumes (``--resume``) or replaces it
(``--overwrite``), so a finished run is never clobbered by accident.

One process at a time: :meth:`RunDirectory.prepare` takes an exclusive ``fcntl.flock`` on
``<run>/.lock`` and holds it until :meth:`RunDirectory.release` (the whole training run), so a
second ``stackwise train`` on the same folder (``--resume`` or ``--overwrite``) is refused
instead of writing beside the first or deleting its files. The kernel drops the lock when its
process dies, so a crashed run never leaves a stale lock. ``--overwrite`` empties the folder but
keeps the lock file (a new lock file would be a new lock). Local file systems only: ``flock``
on NFS depends on the server.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from stackwise._io import atomic_write_text
from stackwise.exceptions import ConfigurationError
from stackwise.run.resume import resume_checkpoint


class RunDirectory:
    """Paths of one run's folder (see the module docstring)."""

    LOCK_NAME = ".lock"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = Path(path)
        self._lock_fd: int | None = None
        # Lines the command should show its user about how the folder was prepared (a
        # repaired checkpoint pointer, for instance).
        self.notes: list[str] = []
        # The checkpoint a resumed run continues from (set by prepare(resume=True)).
        self.resume_folder: Path | None = None

    # -- paths ----------------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def rack(self) -> Path:
        return self.root / "rack"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"

    # -- lifecycle ------------------------------------------------------------------------------

    def is_run(self) -> bool:
        return self.config.is_file()

    def prepare(self, *, resume: bool = False, overwrite: bool = False) -> None:
        """Create the folder for a new run, or check it for a resumed one; either way lock it
        for this process (until :meth:`release`).

        Raises ConfigurationError when the folder exists and neither ``resume`` nor
        ``overwrite`` is set, when ``resume`` finds no run there, or when another process holds
        the folder.
        """
        if resume and overwrite:
            raise ConfigurationError("--resume and --overwrite exclude each other")
        if self.root.exists() and not self.root.is_dir():
            raise ConfigurationError(f"{self.root} exists and is not a folder", "--run-dir")
        blocker = next((p for p in self.root.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise ConfigurationError(
                f"cannot create {self.root}: {blocker} is a file, not a folder", "--run-dir"
            )
        if resume:
            if not self.is_run():
                raise ConfigurationError(
                    f"cannot resume: {self.root} holds no run (no config.yaml)"
                )
            self.lock()
            try:
                self.resume_folder = resume_checkpoint(self.checkpoints, self.notes, repair=True)
            except BaseException:
                self.release()
                raise
            return
        if not overwrite:
            self._refuse_existing()
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock()
        if not overwrite:
            try:  # again under the lock: another run may have filled it meanwhile
                self._refuse_existing()
            except ConfigurationError:
                self.release()
                raise
        for entry in self.root.iterdir():  # --overwrite: everything but the lock itself
            if entry.name == self.LOCK_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _refuse_existing(self) -> None:
        if self.root.is_dir() and any(p.name != self.LOCK_NAME for p in self.root.iterdir()):
            raise ConfigurationError(
                f"run directory {self.root} already exists; pass --resume to continue it or "
                "--overwrite to replace it"
            )

    # -- locking --------------------------------------------------------------------------------

    @property
    def lock_file(self) -> Path:
        return self.root / self.LOCK_NAME

    def lock(self) -> None:
        """Take the run's exclusive lock (non-blocking); raise ConfigurationError naming the
        process that holds it. Taking it twice in one object is a no-op."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigurationError(
                    f"run directory {self.root} is in use by another stackwise process "
                    f"(pid {holder}); wait for it to finish or stop it first",
                    "--run-dir",
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        """Drop the lock (the lock file stays: removing it would let two processes lock two
        different files of one name)."""
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    def read_run_json(self) -> dict[str, Any]:
        if not self.run_json.is_file():
            return {}
        return json.loads(self.run_json.read_text())

    def update_run_json(self, **fields: Any) -> dict[str, Any]:
        record = self.read_run_json()
        record.update(fields)
        atomic_write_text(self.run_json, json.dumps(record, indent=2) + "\n")
        return record

    def require_run(self) -> RunDirectory:
        """Check that the folder holds a trained run (for eval and generate)."""
        if not self.root.is_dir():
            raise ConfigurationError(f"run directory {self.root} does not exist")
        if not self.is_run():
            raise ConfigurationError(f"{self.root} is not a run directory (no config.yaml)")
        return self


def default_run_dir(config_path: str | os.PathLike[str]) -> Path:
    """``runs/<stem of the config file>`` in the current folder."""
    return Path("runs") / Path(config_path).stem
