"""The original StackWise layout loads (stackwise.config.legacy): each of its keys is read as
this project's key with a warning naming the new key, and a value out of range is reported
under the key as the file wrote it."""

from __future__ import annotations

import warnings

import pytest

from stackwise.config.base import StackWiseConfig
from stackwise.config.legacy import OriginalLayoutWarning
from stackwise.exceptions import ConfigurationError

# The shape of the original project's files: architecture instead of n_layers, the optimizer's
# type and lr inside training.optimizer, mask fractions on training, qlora.enabled.
ORIGINAL = """
model:
  vocab_size: 512
  d_model: 64
  n_heads: 4
  n_kv_heads: 4
  d_ff: 128
  architecture:
    n_stacks: 3
    blocks_per_stack: 2
  attention_preset: custom
  attention_custom:
    attention_type: mla
    attention_mode: causal
    mla_rq: 32
    mla_rkv: 16
    kernel_type: linear
    kernel_dim: 8
training:
  batch_size: 4
  max_steps: 20
  optimizer:
    optimizer_type: AdamW
    lr: 2e-4
    weight_decay: 0.01
    betas: [0.9, 0.95]
  min_mask_fraction: 0.0
  max_mask_fraction: 0.5
  mask_schedule_type: cosine
  qlora:
    enabled: false
    rank: 8
  progressive:
    target_stacks: 3
"""


def _load(text: str, overrides=()):
    import yaml

    return StackWiseConfig.from_dict(yaml.safe_load(text), overrides)


def test_original_file_loads_with_each_key_mapped(tmp_path):
    path = tmp_path / "original.yaml"
    path.write_text(ORIGINAL)
    with pytest.warns(OriginalLayoutWarning) as record:
        config = StackWiseConfig.from_yaml(path).validate()
    m, t = config.model, config.training
    assert (m.n_layers, m.architecture.n_stacks, m.architecture.blocks_per_stack) == (6, 3, 2)
    assert (m.attention_type, m.attention_mode) == ("mla", "causal")
    assert (m.mla.q_rank, m.mla.kv_rank, m.kernel.kernel_dim) == (32, 16, 8)
    assert m.kernel.kernel_type == "elu"  # 'linear' is plain dot product: nothing to set
    assert (t.optimizer.name, t.learning_rate) == ("adamw", 2e-4)
    assert (t.masking.min_fraction, t.masking.max_fraction) == (0.0, 0.5)
    assert t.masking.schedule == "cosine"
    assert t.qlora_enabled is False
    messages = "\n".join(str(w.message) for w in record)
    for new in (
        "training.optimizer.name",
        "training.learning_rate",
        "model.mla.q_rank",
        "model.mla.kv_rank",
        "model.kernel.kernel_dim",
        "training.masking.min_fraction",
        "training.masking.max_fraction",
        "training.masking.schedule",
        "training.qlora_enabled",
    ):
        assert f"read as {new}" in messages
    # Saved, the configuration uses this project's keys and loads without warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = StackWiseConfig.from_dict(config.to_dict()).validate()
    assert again == config


@pytest.mark.parametrize(
    ("written", "new"),
    [("Adam", "adam"), ("SGD", "sgd"), ("adamw", "adamw")],
)
def test_optimizer_type_any_case(written, new):
    with pytest.warns(OriginalLayoutWarning, match="read as training.optimizer.name"):
        cfg = _load(f"training: {{optimizer: {{optimizer_type: {written}}}}}")
    assert cfg.training.optimizer.name == new


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (
            "training: {optimizer: {optimizer_type: RMSprop}}",
            "training.optimizer.optimizer_type",
            "'RMSprop' is not one of",
        ),
        ("training: {optimizer: {lr: -1.0}}", "training.optimizer.lr", "must be > 0"),
        ("training: {optimizer: {lr: fast}}", "training.optimizer.lr", "expected a number"),
        ("training: {min_mask_fraction: 1.5}", "training.min_mask_fraction", "must be in [0, 1]"),
        ("training: {max_mask_fraction: -0.1}", "training.max_mask_fraction", "must be in"),
        (
            "training: {mask_schedule_type: sawtooth}",
            "training.mask_schedule_type",
            "is not one of",
        ),
        ("training: {qlora: {enabled: maybe}}", "training.qlora.enabled", "true or false"),
        (
            "model: {attention_preset: mla_attention, attention_custom: {mla_rkv: 0}}",
            "model.attention_custom.mla_rkv",
            "must be > 0",
        ),
        (
            "model: {attention_custom: {kernel_dim: 0, attention_type: kernel}}",
            "model.attention_custom.kernel_dim",
            "must be > 0",
        ),
        (
            "model: {attention_custom: {kernel_type: uniform}}",
            "model.attention_custom.kernel_type",
            "no counterpart",
        ),
        (
            "model: {attention_preset: kernel_attention, attention_custom: {kernel_type: linear}}",
            "model.attention_custom.kernel_type",
            "no counterpart",
        ),
        ("model: {architecture: {n_stacks: 0}}", "model.architecture.n_stacks", "must be > 0"),
        (
            "training: {learning_rate: 0.1, optimizer: {lr: 0.2}}",
            "training.optimizer.lr",
            "both training.optimizer.lr and training.learning_rate",
        ),
    ],
)
def test_out_of_range_names_the_key_as_written(text, key, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OriginalLayoutWarning)
        with pytest.raises(ConfigurationError) as err:
            _load(text).validate()
    assert err.value.key == key
    assert message in str(err.value)


def test_overrides_use_the_original_keys_too():
    with pytest.warns(OriginalLayoutWarning):
        cfg = _load("{}", ["training.optimizer.lr=5e-4", "training.min_mask_fraction=0.2"])
    assert (cfg.training.learning_rate, cfg.training.masking.min_fraction) == (5e-4, 0.2)


def test_older_flat_model_keys():
    text = "model: {attention_type: mla, mla_rq: 0, mla_rkv: 64, mask_fraction_max: 0.8}"
    with pytest.warns(OriginalLayoutWarning):
        cfg = _load(text).validate()
    assert (cfg.model.mla.q_rank, cfg.model.mla.kv_rank) == (0, 64)
    assert cfg.training.masking.max_fraction == 0.8


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("gpt_style", ("gqa", "causal")),
        ("bert_style", ("gqa", "bidirectional")),
    ],
)
def test_presets_with_fewer_kv_heads_group_them(preset, expected):
    # The original layout's gpt_style with n_kv_heads < n_heads is grouped-query attention.
    cfg = _load(f"model: {{attention_preset: {preset}, n_heads: 8, n_kv_heads: 4}}")
    assert (cfg.model.attention_type, cfg.model.attention_mode) == expected


def test_full_featured_preset_is_mlgka():
    with pytest.warns(OriginalLayoutWarning, match="'full_featured'.*'mlgka'"):
        cfg = _load("model: {attention_preset: full_featured}")
    assert cfg.model.attention_type == "mlgka"


def test_attention_custom_is_read_with_any_preset():
    # Before, attention_custom was silently ignored unless attention_preset was 'custom'.
    cfg = _load("model: {attention_preset: gpt_style, attention_custom: {use_rope: true}}")
    assert cfg.model.use_rope is True
    with pytest.raises(ConfigurationError, match="contradicts model.use_rope"):
        _load("model: {use_rope: false, attention_custom: {use_rope: true}}")
