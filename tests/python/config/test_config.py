"""StackWiseConfig: YAML round trips, overrides, the original StackWise layout and presets, and
every validation error path with its message."""

from __future__ import annotations

import textwrap

import pytest

from stackwise.config.base import ModelConfig, StackWiseConfig, TrainingConfig
from stackwise.exceptions import ConfigurationError, StackWiseError


def test_documented_defaults():
    m, t = ModelConfig(), TrainingConfig()
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff) == (
        50257,
        768,
        12,
        12,
        12,
        3072,
    )
    assert (m.attention_type, m.attention_mode, m.use_rope, m.tie_embeddings) == (
        "standard",
        "causal",
        False,
        True,
    )
    assert (t.mode, t.block_size, t.fusion_mode, t.total_blocks) == ("layerwise", 4, "frozen", 2)
    assert (t.learning_rate, t.batch_size, t.max_steps) == (1e-4, 8, 1000)
    assert (t.qlora_enabled, t.quantization_type, t.time_step_masking) == (True, "fp16", True)
    StackWiseConfig().validate()


def test_yaml_round_trip_exact(tmp_path):
    cfg = StackWiseConfig.from_dict(
        {
            "model": {
                "d_model": 256,
                "n_heads": 8,
                "n_kv_heads": 2,
                "attention_type": "gqa",
                "n_layers": 4,
                "architecture": {"n_stacks": 2, "blocks_per_stack": 2},
            },
            "training": {"learning_rate": 3e-4, "optimizer": {"betas": [0.9, 0.99]}},
        }
    )
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    back = StackWiseConfig.from_yaml(path)
    assert back == cfg
    assert back.training.optimizer.betas == (0.9, 0.99)
    assert back.to_dict() == cfg.to_dict()
    assert StackWiseConfig.from_dict(cfg.to_dict()) == cfg


def test_exponent_numbers_load_as_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 1e-4\n  qlora:\n    lr: 5E-5\n")
    cfg = StackWiseConfig.from_yaml(path)
    assert cfg.training.learning_rate == 1e-4 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.qlora.lr == 5e-5


def test_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  batch_size: 4\n")
    cfg = StackWiseConfig.from_yaml(
        path,
        overrides=[
            "training.lr=3e-4",
            "model.use_rope=true",
            "training.batch_size=16",
            "training.optimizer.betas=[0.8, 0.9]",
        ],
    )
    assert cfg.training.learning_rate == 3e-4
    assert cfg.model.use_rope is True and cfg.training.batch_size == 16
    assert cfg.training.optimizer.betas == (0.8, 0.9)
    with pytest.raises(ConfigurationError, match="not of the form key.sub=value"):
        StackWiseConfig.from_dict({}, overrides=["training.lr"])


ORIGINAL_LAYOUT = textwrap.dedent(
    """
    model:
      vocab_size: 50257
      d_model: 512
      n_heads: 8
      n_kv_heads: 2
      d_ff: 2048
      n_layers: 8
      architecture:
        n_stacks: 2
        blocks_per_stack: 4
      attention_preset: efficient_gqa
      tokenizer_embedding:
        family: gpt2
        embedding_option: embed_tokens
        freeze_embeddings: true
    training:
      mode: layerwise
      learning_rate: 1e-4
      progressive:
        enabled: true
        building_mode: append
        target_stacks: 2
        trunk_strategy: qlora
      qlora:
        rank: 16
        alpha: 32
      optimizer:
        name: adamw
        weight_decay: 0.1
    """
)


def test_original_layout_loads(tmp_path):
    path = tmp_path / "orig.yaml"
    path.write_text(ORIGINAL_LAYOUT)
    cfg = StackWiseConfig.from_yaml(path).validate()
    assert cfg.model.attention_type == "gqa" and cfg.model.use_rope is True
    assert cfg.model.n_kv_heads == 2  # explicit value wins over the preset
    assert cfg.model.tokenizer_embedding.embedding_option == "embed_tokens"
    assert cfg.training.qlora.alpha == 32.0 and cfg.training.progressive.trunk_strategy == "qlora"


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("bert_style", ("standard", "bidirectional")),
        ("gpt_style", ("standard", "causal")),
        ("efficient_gqa", ("gqa", "causal")),
        ("mla_attention", ("mla", "causal")),
        ("kernel_attention", ("kernel", "causal")),
        ("mlgka", ("mlgka", "causal")),
    ],
)
def test_presets_map_to_explicit_settings(preset, expected):
    cfg = StackWiseConfig.from_dict({"model": {"attention_preset": preset}})
    assert (cfg.model.attention_type, cfg.model.attention_mode) == expected
    if preset == "efficient_gqa":
        assert cfg.model.n_kv_heads == 3  # 12 heads / 4


def test_custom_preset():
    cfg = StackWiseConfig.from_dict(
        {
            "model": {
                "attention_preset": "custom",
                "attention_custom": {"attention_type": "gqa", "n_kv_heads": 4, "use_rope": True},
            }
        }
    )
    assert cfg.model.attention_type == "gqa" and cfg.model.n_kv_heads == 4


def test_exceptions_are_real_classes():
    from stackwise.exceptions import ModelError, QuantizationError, TrainingError

    for cls in (ConfigurationError, ModelError, QuantizationError, TrainingError):
        assert issubclass(cls, StackWiseError) and issubclass(cls, Exception)
    err = ConfigurationError("bad", "model.d_model")
    assert err.key == "model.d_model" and str(err) == "model.d_model: bad"


# (overrides, dotted key in the message, message fragment)
BAD = [
    ({"model": {"d_modle": 512}}, "model.d_modle", "did you mean 'd_model'"),
    ({"trainig": {}}, "trainig", "did you mean 'training'"),
    ({"model": {"d_model": "big"}}, "model.d_model", "expected an integer"),
    ({"model": {"use_rope": "yes"}}, "model.use_rope", "expected true or false"),
    ({"training": {"learning_rate": "fast"}}, "training.learning_rate", "expected a number"),
    ({"model": {"architecture": 3}}, "model.architecture", "expected a mapping"),
    ({"training": {"optimizer": {"betas": [0.9]}}}, "training.optimizer.betas", "expected 2"),
    ({"model": {"d_model": 0}}, "model.d_model", "must be > 0"),
    ({"model": {"d_model": 100}}, "model.d_model", "not divisible by model.n_heads=12"),
    (
        {"model": {"n_kv_heads": 5, "attention_type": "gqa"}},
        "model.n_heads",
        "not divisible by model.n_kv_heads=5",
    ),
    (
        {"model": {"n_kv_heads": 24, "attention_type": "gqa"}},
        "model.n_kv_heads",
        "exceeds model.n_heads=12",
    ),
    ({"model": {"n_kv_heads": 4}}, "model.n_kv_heads", "use 'gqa' for grouped heads"),
    ({"model": {"attention_type": "flash"}}, "model.attention_type", "is not one of"),
    ({"model": {"attention_mode": "sideways"}}, "model.attention_mode", "is not one of"),
    ({"model": {"attention_preset": "fancy"}}, "model.attention_preset", "is not one of"),
    (
        {"model": {"attention_preset": "custom"}},
        "model.attention_custom",
        "needs an attention_custom mapping",
    ),
    (
        {"model": {"attention_preset": "custom", "attention_custom": {"heads": 2}}},
        "model.attention_custom.heads",
        "unknown key",
    ),
    ({"model": {"norm": "batchnorm"}}, "model.norm", "is not one of"),
    ({"model": {"dropout": 1.0}}, "model.dropout", "must be in [0, 1)"),
    ({"model": {"rope_theta": -1.0}}, "model.rope_theta", "must be > 0"),
    (
        {"model": {"d_model": 780, "n_heads": 12, "use_rope": True, "n_kv_heads": 12}},
        "model.use_rope",
        "even head dim",
    ),
    ({"model": {"n_layers": 10}}, "model.n_layers", "!= architecture.n_stacks x blocks_per_stack"),
    (
        {"model": {"attention_type": "mla", "mla": {"kv_rank": 0}}},
        "model.mla.kv_rank",
        "must be > 0",
    ),
    (
        {"model": {"attention_type": "mla", "mla": {"rope_head_dim": 7}}},
        "model.mla.rope_head_dim",
        "must be even",
    ),
    (
        {"model": {"attention_type": "mla", "mla": {"kv_rank": 4096}}},
        "model.mla.kv_rank",
        "the latent must compress",
    ),
    (
        {"model": {"attention_type": "kernel", "kernel": {"kernel_type": "poly"}}},
        "model.kernel.kernel_type",
        "is not one of",
    ),
    (
        {"model": {"attention_type": "kernel", "kernel": {"kernel_dim": 0}}},
        "model.kernel.kernel_dim",
        "must be > 0",
    ),
    (
        {"model": {"tokenizer_embedding": {"family": "t5"}}},
        "model.tokenizer_embedding.family",
        "is not one of",
    ),
    (
        {"model": {"tokenizer_embedding": {"embedding_option": "random"}}},
        "model.tokenizer_embedding.embedding_option",
        "is not one of",
    ),
    (
        {
            "model": {
                "tokenizer_embedding": {
                    "embedding_option": "embed_tokens",
                    "embedding_dim": 1024,
                    "adapter": False,
                }
            }
        },
        "model.tokenizer_embedding.adapter",
        "set adapter: true",
    ),
    (
        {"model": {"tokenizer_embedding": {"freeze_embeddings": True}}},
        "model.tokenizer_embedding.freeze_embeddings",
        "never trains",
    ),
    ({"training": {"learning_rate": 0.0}}, "training.learning_rate", "must be > 0"),
    ({"training": {"batch_size": -2}}, "training.batch_size", "must be > 0"),
    ({"training": {"max_steps": -1}}, "training.max_steps", "must be >= 0"),
    ({"training": {"seq_len": 4096}}, "training.seq_len", "exceeds model.max_seq_len=1024"),
    ({"training": {"optimizer": {"name": "lion"}}}, "training.optimizer.name", "is not one of"),
    (
        {"training": {"optimizer": {"betas": [0.9, 1.0]}}},
        "training.optimizer.betas[1]",
        "must be in [0, 1)",
    ),
    (
        {"training": {"optimizer": {"schedule": "step"}}},
        "training.optimizer.schedule",
        "is not one of",
    ),
    (
        {"training": {"progressive": {"building_mode": "insert"}}},
        "training.progressive.building_mode",
        "is not one of",
    ),
    (
        {"training": {"progressive": {"trunk_strategy": "melted"}}},
        "training.progressive.trunk_strategy",
        "is not one of",
    ),
    (
        {"training": {"progressive": {"target_stacks": 5}}},
        "training.progressive.target_stacks",
        "exceeds model.architecture.n_stacks=2",
    ),
    (
        {"training": {"progressive": {"training_objective": "mlm"}}},
        "model.attention_mode",
        "use 'bidirectional'",
    ),
    ({"model": {"attention_mode": "bidirectional"}}, "model.attention_mode", "use 'causal'"),
    (
        {"training": {"progressive": {"building_mode": "prepend"}}},
        "training.progressive.training_objective",
        "use 'diffusion' or 'mlm'",
    ),
    (
        {"training": {"progressive": {"time_interpretation": "space"}}},
        "training.progressive.time_interpretation",
        "is not one of",
    ),
    ({"training": {"qlora": {"rank": 0}}}, "training.qlora.rank", "must be > 0"),
    (
        {"training": {"qlora": {"progressive_rank": True, "min_rank": 32}}},
        "training.qlora.min_rank",
        "must be in [1, rank=16]",
    ),
    (
        {"training": {"masking": {"min_fraction": 0.8, "max_fraction": 0.2}}},
        "training.masking.min_fraction",
        "exceeds training.masking.max_fraction=0.2",
    ),
    (
        {"training": {"masking": {"schedule": "zigzag"}}},
        "training.masking.schedule",
        "is not one of",
    ),
    (
        {"training": {"masking": {"mask_token_prob": 0.95}}},
        "training.masking.random_token_prob",
        "exceeds 1",
    ),
    ({"training": {"quantization_type": "int3"}}, "training.quantization_type", "is not one of"),
    (
        {"training": {"caching": {"storage_precision": "everything"}}},
        "training.caching.storage_precision",
        "is not one of",
    ),
    (
        {"training": {"caching": {"storage_precision": "int4"}}},
        "training.caching.storage_precision",
        "is not one of",
    ),
    ({"training": {"device": "tpu"}}, "training.device", "is not one of"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction", "must be in (0, 1)"),
    ({"training": {"lr": 1e-3, "learning_rate": 1e-3}}, "training.lr", "keep one"),
]


@pytest.mark.parametrize("data,key,fragment", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_configs_name_key_and_reason(data, key, fragment):
    with pytest.raises(ConfigurationError) as info:
        StackWiseConfig.from_dict(data).validate()
    assert info.value.key == key, str(info.value)
    assert fragment in str(info.value)


def test_all_problems_listed():
    with pytest.raises(ConfigurationError, match=r"and 1 more:\n  training.batch_size"):
        StackWiseConfig.from_dict(
            {"model": {"d_model": 0}, "training": {"batch_size": 0}}
        ).validate()


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        StackWiseConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigurationError, match="not valid YAML"):
        StackWiseConfig.from_yaml(bad)


def test_shipped_configs_validate():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[3] / "configs"
    files = sorted(folder.glob("*.yaml"))
    assert files
    for f in files:
        StackWiseConfig.from_yaml(f).validate()
