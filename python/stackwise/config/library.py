"""The shipped configuration library: ``stackwise train --config shakespeare-tiny`` by name.

The source of the library is the repository's ``configs/`` folder (one documented YAML recipe
per file, each trained by ``tests/python/test_configs.py``). A wheel or a ``pip install .``
carries a copy as package data, ``stackwise/configs/``, made at build time by ``setup.py``
(``build_py``); a checkout or an editable install reads ``configs/`` itself. There is one copy in
git.

A configuration argument is a path when such a file exists; otherwise a bare name (``NAME`` or
``NAME.yaml``, no folder) is looked up in the library. Each file's first comment line is its
one-line description (``stackwise config list``).
"""

from __future__ import annotations

import os
from pathlib import Path

from stackwise.exceptions import ConfigurationError

PACKAGE_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
"""Where a built package keeps its copy of the library (``stackwise/configs``)."""

CHECKOUT_CONFIGS = Path(__file__).resolve().parents[3] / "configs"
"""The repository's ``configs/`` when the package runs from a checkout (python/stackwise)."""


def library_dir() -> Path:
    """The folder the library is read from: the package's copy when the package was built,
    else the checkout's ``configs/``; an error when neither holds a configuration."""
    for folder in (PACKAGE_CONFIGS, CHECKOUT_CONFIGS):
        if folder.is_dir() and any(folder.glob("*.yaml")):
            return folder
    raise ConfigurationError(
        f"no configuration library: neither {PACKAGE_CONFIGS} (an installed package) nor "
        f"{CHECKOUT_CONFIGS} (a checkout) holds *.yaml files; reinstall stackwise"
    )


def library_configs() -> dict[str, Path]:
    """Name (file stem) -> path of every shipped configuration, sorted by name."""
    folder = library_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def describe(path: str | os.PathLike[str]) -> str:
    """A configuration's one-line description: its first comment line when that is a whole
    sentence (ends with "."), else the first comment paragraph up to its first ": " or ". "."""
    lines: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if not text.startswith("#") or not text.lstrip("#").strip():
                break
            lines.append(text.lstrip("#").strip())
    if not lines:
        return ""
    if lines[0].endswith("."):
        return lines[0]
    joined = " ".join(lines)
    cuts = [i for i in (joined.find(": "), joined.find(". ")) if i > 0]
    return joined[: min(cuts)] if cuts else joined


def resolve_config(arg: str | os.PathLike[str]) -> Path:
    """The file a ``--config`` argument names: an existing path as given, else a shipped
    configuration by name (``shakespeare-tiny`` or ``shakespeare-tiny.yaml``); a bare name that
    is neither is an error listing the shipped ones."""
    path = Path(arg)
    if path.is_file():
        return path
    text = str(arg)
    if os.sep not in text and "/" not in text:
        name = text[: -len(".yaml")] if text.endswith(".yaml") else text
        shipped = library_configs()
        if name in shipped:
            return shipped[name]
        raise ConfigurationError(
            f"config file {text} does not exist and is not a shipped configuration "
            f"(shipped: {', '.join(shipped)}; stackwise config list)"
        )
    return path  # a path that does not exist: the loader says so


__all__ = ["describe", "library_configs", "library_dir", "resolve_config"]
