"""The original StackWise layout: keys of the original project's YAML files read as this
project's keys, each with a :class:`OriginalLayoutWarning` naming the key to use instead.

    raw, written_as = translate_original_layout(yaml_data)

``translate_original_layout`` rewrites the plain data (as YAML loads it) before the dataclasses
are built, and returns ``written_as``: each new dotted key -> the key as the file wrote it, so
that a value out of range is reported under the name the user wrote (``training.optimizer.lr:
-1.0 must be > 0``, not ``training.learning_rate``). The renames:

==========================================  ================================================
original key                                read as
==========================================  ================================================
``training.optimizer.optimizer_type``       ``training.optimizer.name`` (AdamW, Adam, SGD;
                                            any case)
``training.optimizer.lr``                   ``training.learning_rate``
``model.attention_custom.mla_rq``           ``model.mla.q_rank`` (null: 0, full-rank queries)
``model.attention_custom.mla_rkv``          ``model.mla.kv_rank``
``model.attention_custom.kernel_type``      ``model.kernel.kernel_type`` (see below)
``model.attention_custom.kernel_dim``       ``model.kernel.kernel_dim``
``model.{mla_rq, mla_rkv, kernel_type,      the same, from the older flat model section
kernel_dim}``
``model.mask_fraction_min`` / ``_max``      ``training.masking.min_fraction`` / ``max_fraction``
``training.min_mask_fraction`` / ``max_``   ``training.masking.min_fraction`` / ``max_fraction``
``training.mask_schedule_type``             ``training.masking.schedule``
``training.qlora.enabled``                  ``training.qlora_enabled``
``model.attention_preset: full_featured``   ``mlgka`` (GQA + multi-latent + kernel attention)
==========================================  ================================================

The original ``kernel_type: linear`` is the identity feature map, i.e. plain dot-product
attention: it is accepted (and dropped) when the attention type is not kernel-based, and refused
with kernel attention; ``uniform`` (cosine features of uniform projections) has no counterpart
here and is refused. :data:`ATTENTION_PRESETS` says what each preset name means. The rest of
``attention_custom`` (``attention_type``, ``attention_mode``, ``use_rope``, ``n_kv_heads``,
``rope_theta``) keeps its meaning (see :mod:`stackwise.config.base`).
"""

from __future__ import annotations

import warnings
from typing import Any

from stackwise.exceptions import ConfigurationError


class OriginalLayoutWarning(UserWarning):
    """A key of the original StackWise layout was read as this project's key."""


# What each attention preset of the original layout means, as explicit settings. A key the YAML
# sets itself wins over the preset.
ATTENTION_PRESETS: dict[str, dict[str, Any]] = {
    "bert_style": {"attention_type": "standard", "attention_mode": "bidirectional"},
    "gpt_style": {"attention_type": "standard", "attention_mode": "causal"},
    "efficient_gqa": {"attention_type": "gqa", "attention_mode": "causal", "use_rope": True},
    "mla_attention": {"attention_type": "mla", "attention_mode": "causal", "use_rope": True},
    "kernel_attention": {"attention_type": "kernel", "attention_mode": "causal"},
    "mlgka": {"attention_type": "mlgka", "attention_mode": "causal", "use_rope": True},
    "custom": {},
}

# original dotted key -> this project's dotted key
RENAMES: dict[str, str] = {
    "training.optimizer.optimizer_type": "training.optimizer.name",
    "training.optimizer.lr": "training.learning_rate",
    "model.attention_custom.mla_rq": "model.mla.q_rank",
    "model.attention_custom.mla_rkv": "model.mla.kv_rank",
    "model.attention_custom.kernel_type": "model.kernel.kernel_type",
    "model.attention_custom.kernel_dim": "model.kernel.kernel_dim",
    "model.mla_rq": "model.mla.q_rank",
    "model.mla_rkv": "model.mla.kv_rank",
    "model.kernel_type": "model.kernel.kernel_type",
    "model.kernel_dim": "model.kernel.kernel_dim",
    "model.mask_fraction_min": "training.masking.min_fraction",
    "model.mask_fraction_max": "training.masking.max_fraction",
    "training.min_mask_fraction": "training.masking.min_fraction",
    "training.max_mask_fraction": "training.masking.max_fraction",
    "training.mask_schedule_type": "training.masking.schedule",
    "training.qlora.enabled": "training.qlora_enabled",
}
PRESET_RENAMES = {"full_featured": "mlgka"}
_OPTIMIZERS = {"adamw": "adamw", "adam": "adam", "sgd": "sgd"}
_KERNEL_ATTENTION = ("kernel", "mlgka")
_MISSING = object()


def _pop(raw: dict[str, Any], dotted: str) -> Any:
    *path, last = dotted.split(".")
    node: Any = raw
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        return _MISSING
    return node.pop(last)


def _has(raw: dict[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _put(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    node = raw
    for part in path:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigurationError(f"expected a mapping, got {nxt!r}", part)
        node = nxt
    node[last] = value


def _attention_type(raw: dict[str, Any]) -> Any:
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    custom = model.get("attention_custom")
    if isinstance(custom, dict) and "attention_type" in custom:
        return custom["attention_type"]
    preset = PRESET_RENAMES.get(model.get("attention_preset"), model.get("attention_preset"))
    from_preset = ATTENTION_PRESETS.get(preset, {}).get("attention_type") if preset else None
    return model.get("attention_type", from_preset)


def _translate_value(written: str, value: Any, raw: dict[str, Any]) -> Any:
    """The value in this project's terms, ``_MISSING`` to drop it, or ConfigurationError."""
    if written.endswith("optimizer_type"):
        name = _OPTIMIZERS.get(value.lower()) if isinstance(value, str) else None
        if name is None:
            raise ConfigurationError(f"{value!r} is not one of ['AdamW', 'Adam', 'SGD']", written)
        return name
    if written.endswith("kernel_type") and value in ("linear", "uniform"):
        attention = _attention_type(raw)
        if value == "linear" and attention not in _KERNEL_ATTENTION:
            return _MISSING  # the identity map: what non-kernel attention computes anyway
        raise ConfigurationError(
            f"{value!r} has no counterpart here (with attention_type {attention!r}); use "
            "one of ['elu', 'relu', 'gaussian', 'softmax', 'laplacian'], or attention_type "
            "'standard' for plain dot-product attention",
            written,
        )
    if written.endswith("mla_rq") and value is None:
        return 0
    if written.endswith("mla_rkv") and value is None:
        return _MISSING
    return value


# Keys that were accepted and never read; a file that sets them gets an error saying why.
REMOVED: dict[str, str] = {
    "training.caching.cache_mode": (
        "removed: the trainers keep exactly the boundary the stage being trained reads (the "
        "activation cache's 'rack' mode); delete the key (CacheManager(cache_mode=...) remains "
        "for direct use)"
    ),
    "data.packing": (
        "removed: the loaders always pack the token stream (documents joined by the end-of-text "
        "token) into windows of seq_len; delete the key"
    ),
    "training.progressive.new_stack_precision": (
        "removed: the stack being trained keeps fp32 master weights; use training.dtype (bf16 "
        "or fp16) for mixed-precision compute, and training.quantization_type for the trunk"
    ),
}


def check_removed(raw: dict[str, Any]) -> None:
    """ConfigurationError naming the first removed key ``raw`` sets (:data:`REMOVED`)."""
    for key, why in REMOVED.items():
        if _has(raw, key):
            raise ConfigurationError(why, key)


def translate_original_layout(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Rewrite the original layout's keys in ``raw`` (in place) as this project's keys; return
    ``(raw, written_as)``. Raise ConfigurationError, naming the key as written, for a value
    with no counterpart or a key set under both its old and its new name."""
    written_as: dict[str, str] = {}
    for written, new in RENAMES.items():
        value = _pop(raw, written)
        if value is _MISSING:
            continue
        if _has(raw, new) or new in written_as:
            other = written_as.get(new, new)
            raise ConfigurationError(f"both {written} and {other} are set; keep one", written)
        original, value = value, _translate_value(written, value, raw)
        written_as[new] = written
        if value is _MISSING:
            warnings.warn(
                f"{written}: {original!r} is plain dot-product attention, what the configured "
                "attention computes; the key is not needed",
                OriginalLayoutWarning,
                stacklevel=3,
            )
            continue
        _put(raw, new, value)
        warnings.warn(
            f"{written} is a key of the original StackWise layout; read as {new}",
            OriginalLayoutWarning,
            stacklevel=3,
        )
    model = raw.get("model")
    if isinstance(model, dict) and model.get("attention_preset") in PRESET_RENAMES:
        old = model["attention_preset"]
        model["attention_preset"] = PRESET_RENAMES[old]
        warnings.warn(
            f"model.attention_preset {old!r} is the original layout's name; read as "
            f"{model['attention_preset']!r}",
            OriginalLayoutWarning,
            stacklevel=3,
        )
    custom = model.get("attention_custom") if isinstance(model, dict) else None
    if isinstance(custom, dict) and not custom and model.get("attention_preset") != "custom":
        del model["attention_custom"]  # every entry was moved to its own section
    return raw, written_as


__all__ = [
    "ATTENTION_PRESETS",
    "OriginalLayoutWarning",
    "PRESET_RENAMES",
    "REMOVED",
    "RENAMES",
    "check_removed",
    "translate_original_layout",
]
