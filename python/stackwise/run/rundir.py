"""The run directory of ``stackwise train``: one folder per run, holding everything it wrote.

    runs/<config-stem>/
      config.yaml        the resolved configuration (overrides applied, validated)
      run.json           tokenizer, corpus, command line, status (running / finished / failed)
      metrics.jsonl      one JSON object per logged step, evaluation and stage (run/metrics.py)
      train.log          the plain progress lines, and the traceback of a failure
      tensorboard/       TensorBoard events (only when tensorboardX is importable)
      checkpoints/       stage checkpoints (training/checkpoint.py), for --resume
      rack/              the final rack (model.safetensors, config.yaml, manifest.json)
      plots/loss.png     train and validation loss over global steps, stage boundaries marked
      plots/memory.png   peak memory per stage
      summary.json       final figures; summary.md the same for people

An existing folder is refused unless the run resumes (``--resume``) or replaces it
(``--overwrite``), so a finished run is never clobbered by accident.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from stackwise._io import atomic_write_text
from stackwise.exceptions import ConfigurationError


class RunDirectory:
    """Paths of one run's folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.root = Path(path)

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
        """Create the folder for a new run, or check it for a resumed one.

        Raises ConfigurationError when the folder exists and neither ``resume`` nor
        ``overwrite`` is set, or when ``resume`` finds no run there.
        """
        if resume and overwrite:
            raise ConfigurationError("--resume and --overwrite exclude each other")
        if resume:
            if not self.is_run():
                raise ConfigurationError(
                    f"cannot resume: {self.root} holds no run (no config.yaml)"
                )
            return
        if self.root.exists() and any(self.root.iterdir()):
            if not overwrite:
                raise ConfigurationError(
                    f"run directory {self.root} already exists; pass --resume to continue it or "
                    "--overwrite to replace it"
                )
            if not self.root.is_dir():
                raise ConfigurationError(f"{self.root} exists and is not a folder")
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

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
