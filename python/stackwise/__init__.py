"""stackwise: block-by-block training of transformer language models on native C++/CUDA kernels.

Importing the package loads the native extension (``stackwise._C``), which registers the
``torch.ops.stackwise`` ops, and the Python wrappers in :mod:`stackwise.ops`.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension that links it)

from stackwise._native import load_extension

_C = load_extension()

from stackwise import ops  # noqa: E402
from stackwise.exceptions import (  # noqa: E402
    CacheCorruptionError,
    ConfigurationError,
    ModelError,
    QuantizationError,
    StackWiseError,
    TrainingError,
)

__version__: str = _C.build_info()["version"]

__all__ = [
    "CacheCorruptionError",
    "ConfigurationError",
    "ModelError",
    "QuantizationError",
    "StackWiseError",
    "TrainingError",
    "__version__",
    "ops",
]
