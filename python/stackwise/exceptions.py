"""The project's exceptions (docs/DESIGN.md §6).

Every error stackwise raises on purpose derives from :class:`StackWiseError`, so a caller can catch
them all; each names what was wrong (a dotted config key, an argument, a file).
"""

from __future__ import annotations


class StackWiseError(Exception):
    """Base class of every stackwise error."""


class ConfigurationError(StackWiseError, ValueError):
    """A configuration value is missing, of the wrong type or out of range.

    ``key`` is the dotted path of the offending entry (for example ``"training.qlora.rank"``).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class ModelError(StackWiseError):
    """The model is inconsistent: shapes, layer wiring, weights that do not fit."""


class RackLayoutError(ModelError):
    """Saved weights hold stacks a plain rack cannot take (converted to int8 / nf4 / fp8 or
    carrying adapters): such a rack is rebuilt from its training checkpoint instead."""


class TrainingError(StackWiseError):
    """Training cannot go on: divergence, a stage out of order, a checkpoint that does not match."""


class QuantizationError(StackWiseError):
    """A tensor cannot be quantized or dequantized as asked (format, block size, dtype)."""


class CacheCorruptionError(StackWiseError):
    """A cache spill file or checkpoint failed its integrity check; ``path`` names the file."""

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class CacheBudgetError(StackWiseError, RuntimeError):
    """An activation-cache ``put`` would exceed a memory or entry budget and the store has no
    spill directory to move entries to (nothing is dropped)."""
