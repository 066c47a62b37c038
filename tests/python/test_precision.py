"""The one precision vocabulary (stackwise.precision): every spelling means the same precision
in the configuration, the quantization manager, the rack builder, the activation cache and the
weight backups, and each configuration field accepts exactly what its consumer accepts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stackwise import precision
from stackwise.config._schema import config_choices
from stackwise.config.base import CachingConfig, StackWiseConfig, TrainingConfig
from stackwise.exceptions import ConfigurationError, QuantizationError, TrainingError
from stackwise.training.backup import canonical_backup_precision
from stackwise.training.strategies.caching import CacheManager
from stackwise.training.strategies.quantization import QuantizationManager, canonical_precision


def test_aliases_name_one_canonical_precision_each():
    assert precision.canonical("full") == "fp32"
    assert precision.canonical("half") == "fp16"
    assert precision.canonical("bfloat16") == "bf16"
    assert precision.canonical("fp8") == "fp8_e4m3"
    assert precision.canonical("FP16") == "fp16"
    assert precision.dtype_of("half") is torch.float16
    assert precision.dtype_of("fp8_e5m2") is torch.float8_e5m2
    spellings = [s for p in precision.PRECISIONS.values() for s in (p.name, *p.aliases)]
    assert len(spellings) == len(set(spellings)) == len(precision.ALIASES)


def test_unknown_or_misplaced_precision_names_key_and_choices():
    with pytest.raises(ConfigurationError, match=r"^x\.y: 'int4' is not one of"):
        precision.canonical("int4", key="x.y")
    with pytest.raises(ConfigurationError, match="'nf4' is not one of.*'as_is'"):
        precision.canonical("nf4", precision.CACHE_STORAGE)
    with pytest.raises(TrainingError, match="cache_precision 'int8' is not one of"):
        canonical_backup_precision("int8")
    with pytest.raises(QuantizationError, match="unknown precision 7"):
        canonical_precision(7)


def _field(cls, name):
    return next(f for f in dataclasses.fields(cls) if f.name == name)


@pytest.mark.parametrize("value", precision.spellings(precision.TRUNK_STORAGE))
def test_every_quantization_type_the_config_accepts_converts(value):
    assert value in config_choices(TrainingConfig, "quantization_type")
    assert QuantizationManager(precision=value).precision == precision.canonical(value)


@pytest.mark.parametrize("value", config_choices(CachingConfig, "storage_precision"))
def test_every_cache_precision_the_config_accepts_the_cache_takes(value):
    cm = CacheManager(storage_precision=value)
    assert cm.storage_precision == precision.PRECISIONS[precision.canonical(value)].cache_format


@pytest.mark.parametrize("value", config_choices(TrainingConfig, "dtype"))
def test_compute_dtypes_are_float_casts(value):
    # auto is bf16 on CUDA and fp32 on the CPU (compute_dtype in training/step.py)
    for name in ("bf16", "fp32") if value == "auto" else (value,):
        assert canonical_backup_precision(name) in precision.FLOAT


def test_cache_precision_fp32_is_refused_by_config_as_by_the_cache():
    # Before: the config listed fp32 for training.caching.storage_precision but the cache
    # manager refused it, so a validated config failed when the cache was built.
    with pytest.raises(ConfigurationError, match="training.caching.storage_precision"):
        StackWiseConfig.from_dict(
            {"training": {"caching": {"storage_precision": "fp32"}}}
        ).validate()
    with pytest.raises(ConfigurationError, match="storage_precision"):
        CacheManager(storage_precision="fp32")
