"""The one precision vocabulary: every name a precision goes by, its canonical name, the torch
dtype its values are stored in, and where each precision may be used.

    from stackwise.precision import canonical, CACHE_STORAGE
    canonical("half")                          # "fp16"
    canonical("nf4", allowed=CACHE_STORAGE)    # ConfigurationError: not usable there

The configuration fields (``training.quantization_type``, ``training.dtype``,
``training.caching.storage_precision``), the quantization manager, the
rack builder, the activation cache and the weight backups all read this table, so a spelling
accepted in one place means the same thing everywhere. A use is a tuple of canonical names:

- :data:`FLOAT`: plain floating-point casts (trained stacks, weight backups, norms).
- :data:`TRUNK_STORAGE`: what a frozen trunk stack may be converted to (floats, or a
  :class:`~stackwise.model.quantized.QuantizedLinear` format).
- :data:`CACHE_STORAGE`: what the native activation cache can store (``as_is`` keeps the
  activations' own dtype; ``fp8`` there is e4m3).

This module sits below ``config`` (it imports only torch and the exceptions), so the
configuration and the training code can both import it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stackwise.exceptions import ConfigurationError, StackWiseError


@dataclass(frozen=True)
class Precision:
    """One precision. ``dtype`` is the element type its values are stored in (None for
    ``as_is``); ``quantized`` means codes plus scales rather than a plain cast; ``cache_format``
    is the native cache store's name for it (None when the store cannot hold it)."""

    name: str
    aliases: tuple[str, ...]
    dtype: torch.dtype | None
    quantized: bool
    cache_format: str | None


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", ("full", "float32"), torch.float32, False, None),
        Precision("fp16", ("half", "float16"), torch.float16, False, "fp16"),
        Precision("bf16", ("bfloat16",), torch.bfloat16, False, "bf16"),
        Precision("int8", (), torch.int8, True, "int8"),
        Precision("nf4", (), torch.uint8, True, None),
        Precision("fp8_e4m3", ("fp8",), torch.float8_e4m3fn, True, "fp8"),
        Precision("fp8_e5m2", (), torch.float8_e5m2, True, None),
        Precision("as_is", ("none",), None, False, "as_is"),
    )
}

# Every accepted spelling -> canonical name.
ALIASES: dict[str, str] = {
    spelling: p.name for p in PRECISIONS.values() for spelling in (p.name, *p.aliases)
}

FLOAT: tuple[str, ...] = ("fp32", "fp16", "bf16")
TRUNK_STORAGE: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8", "nf4", "fp8_e4m3", "fp8_e5m2")
CACHE_STORAGE: tuple[str, ...] = ("as_is", "fp16", "bf16", "int8", "fp8_e4m3")
QUANTIZED: tuple[str, ...] = tuple(n for n, p in PRECISIONS.items() if p.quantized)


def spellings(allowed: tuple[str, ...]) -> tuple[str, ...]:
    """Every accepted name of the canonical precisions ``allowed``, each followed by its
    aliases (the allowed values of a configuration field)."""
    return tuple(s for name in allowed for s in (name, *PRECISIONS[name].aliases))


def canonical(
    precision: object,
    allowed: tuple[str, ...] = tuple(PRECISIONS),
    *,
    key: str | None = None,
    error: type[StackWiseError] = ConfigurationError,
) -> str:
    """The canonical name of ``precision`` (case-insensitive), or ``error`` naming ``key`` and
    the accepted spellings when it is unknown or not one of ``allowed``."""
    name = ALIASES.get(precision.lower()) if isinstance(precision, str) else None
    if name is None or name not in allowed:
        choices = list(spellings(allowed))
        if error is ConfigurationError:
            raise ConfigurationError(f"{precision!r} is not one of {choices}", key)
        if key:
            raise error(f"{key} {precision!r} is not one of {choices}")
        raise error(f"unknown precision {precision!r}; expected one of {choices}")
    return name


def dtype_of(precision: str) -> torch.dtype:
    """The storage dtype of a precision (any spelling); ``as_is`` has none."""
    p = PRECISIONS[canonical(precision)]
    if p.dtype is None:
        raise ConfigurationError(f"{precision!r} keeps each tensor's own dtype; it has none")
    return p.dtype


__all__ = [
    "ALIASES",
    "CACHE_STORAGE",
    "FLOAT",
    "PRECISIONS",
    "QUANTIZED",
    "TRUNK_STORAGE",
    "Precision",
    "canonical",
    "dtype_of",
    "spellings",
]
