"""Loads the native extension ``stackwise._C`` and checks it matches the running torch.

Importing ``_C`` registers every ``torch.ops.stackwise.*`` op (TORCH_LIBRARY in the C++ core).
When the extension is missing, or was built against another torch, the ImportError says how to
rebuild instead of failing later with an undefined symbol or a missing op.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

_BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(or `make build`), using the Python environment that runs stackwise"
)


def load_extension() -> ModuleType:
    """Import ``stackwise._C``, verifying it was built against the torch now imported."""
    try:
        module = importlib.import_module("stackwise._C")
    except ImportError as exc:
        raise ImportError(
            f"stackwise's native extension stackwise._C could not be loaded ({exc}); {_BUILD_HINT}"
        ) from exc
    built_for = module.build_info()["torch_version"]
    if built_for != torch.__version__:
        raise ImportError(
            f"stackwise._C was built against torch {built_for} but torch {torch.__version__} "
            f"is installed; rebuild: {_BUILD_HINT}"
        )
    return module
