"""stackwise's configuration: dataclasses, YAML I/O, overrides and validation.

    from stackwise.config.base import StackWiseConfig
    config = StackWiseConfig.from_yaml("config.yaml", overrides=["training.lr=3e-4"])
    config.validate()
    model_config, training_config = config.model, config.training

Sections mirror the YAML layout of the original StackWise project (``model.architecture``,
``model.attention_preset`` / ``attention_custom``, ``model.tokenizer_embedding``,
``training.progressive``, ``training.qlora``, ``training.optimizer``); the keys that project
named differently are read through :mod:`stackwise.config.legacy`, with a warning naming the key
to use. Validation rules live in :mod:`stackwise.config.validation`.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stackwise import precision
from stackwise._io import atomic_write_text
from stackwise.config import _schema
from stackwise.config._schema import choice
from stackwise.config.legacy import ATTENTION_PRESETS, check_removed, translate_original_layout
from stackwise.config.validation import validate_config
from stackwise.exceptions import (  # noqa: F401  (re-exported with the configuration)
    ConfigurationError,
    ModelError,
    QuantizationError,
    TrainingError,
)

# ---- model ------------------------------------------------------------------------------------


@dataclass
class ArchitectureConfig:
    """The rack's shape: ``n_stacks`` stacks of ``blocks_per_stack`` blocks."""

    n_stacks: int = 2
    blocks_per_stack: int = 6


@dataclass
class MLAConfig:
    """DeepSeek-V2 multi-head latent attention ranks (attention_type "mla" / "mlgka").

    ``q_rank`` 0 means full-rank queries; ``rope_head_dim`` is the decoupled RoPE part of each
    query/key head; ``v_head_dim`` None means d_model / n_heads.
    """

    q_rank: int = 0
    kv_rank: int = 256
    rope_head_dim: int = 32
    v_head_dim: int | None = None


@dataclass
class KernelAttentionConfig:
    """Feature map of kernel (linear) attention: elu, relu, gaussian, softmax (FAVOR+),
    laplacian; ``kernel_dim`` features per head, random projections seeded by ``seed``."""

    kernel_type: str = choice("elu", ("elu", "relu", "gaussian", "softmax", "laplacian"))
    kernel_dim: int = 64
    seed: int = 0


@dataclass
class TokenizerEmbeddingConfig:
    """The lexical kernel: tokenizer family and where the embedding table comes from.

    ``embedding_option`` "learned" trains a table from scratch; "embed_tokens" loads a
    pretrained one from ``path`` (or STACKWISE_EMBEDDINGS_PATH). ``embedding_dim`` is the
    pretrained table's width when it differs from d_model; then ``adapter`` must be true (a
    trainable projection).
    """

    family: str = choice("gpt2", ("gpt2", "bert", "llama", "custom"))
    embedding_option: str = choice("learned", ("learned", "embed_tokens"))
    freeze_embeddings: bool = False
    path: str | None = None
    embedding_dim: int | None = None
    adapter: bool = True
    adapter_hidden_dim: int | None = None


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int = 12
    d_ff: int = 3072
    attention_type: str = choice("standard", ("standard", "mha", "gqa", "mla", "kernel", "mlgka"))
    attention_mode: str = choice("causal", ("causal", "bidirectional"))
    use_rope: bool = False
    tie_embeddings: bool = True
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    attention_preset: str | None = None
    attention_custom: dict[str, Any] | None = None
    mla: MLAConfig = field(default_factory=MLAConfig)
    kernel: KernelAttentionConfig = field(default_factory=KernelAttentionConfig)
    rope_theta: float = 10000.0
    max_seq_len: int = 1024
    norm: str = choice("rmsnorm", ("rmsnorm", "layernorm"))
    norm_eps: float = 1e-6
    dropout: float = 0.0
    freeze_up_proj: bool = False
    tokenizer_embedding: TokenizerEmbeddingConfig = field(default_factory=TokenizerEmbeddingConfig)
    # Width of one attention head; None means d_model / n_heads. Llama-family models such as
    # those with head_dim != hidden_size / num_attention_heads set it explicitly.
    head_dim: int | None = None

    @property
    def attention_head_dim(self) -> int:
        """The width of one attention head (``head_dim`` or d_model / n_heads)."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads


# ---- training ---------------------------------------------------------------------------------


@dataclass
class OptimizerConfig:
    name: str = choice("adamw", ("adamw", "adam", "sgd"))
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    momentum: float = 0.9
    warmup_steps: int = 0
    schedule: str = choice("cosine", ("cosine", "linear", "constant"))
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accumulation: int = 1


@dataclass
class ProgressiveConfig:
    enabled: bool = True
    building_mode: str = choice("append", ("append", "prepend"))
    target_stacks: int = 2
    trunk_strategy: str = choice("frozen", ("frozen", "qlora"))
    cache_activations: bool = True
    time_interpretation: str = choice("depth", ("depth", "input"))
    training_objective: str = choice("clm", ("clm", "mlm", "diffusion"))
    epochs_per_stack: int = 1
    steps_per_stack: int | None = None
    new_stack_init: str = choice("auto", ("auto", "random", "identity", "copy"))
    stage_budget: str = choice("front_loaded", ("uniform", "front_loaded", "back_loaded"))
    consolidation_steps: int = 0
    trunk_checkpointing: bool = False
    stage_lr_scale: float = 1.0
    noise_ranges: str = choice("none", ("none", "linear", "equal_mass"))


@dataclass
class QLoRAConfig:
    """LoRA adapters on quantized trunk layers. With ``progressive_rank``, the adapter of the
    stack k places from the newest gets rank max(min_rank, rank * rank_decay**k) (alpha scaled
    the same way). ``new_stack_lora`` (dual-LoRA) also puts a LoRA of ``rank``/``alpha`` on the
    stack being trained, in its own optimizer group at ``lr``; it is merged into the stack's
    weights when the stack joins the trunk."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    lr: float = 1e-4
    progressive_rank: bool = False
    rank_decay: float = 0.5
    min_rank: int = 4
    new_stack_lora: bool = False


@dataclass
class MaskingConfig:
    min_fraction: float = 0.1
    max_fraction: float = 0.9
    schedule: str = choice("linear", ("linear", "cosine", "exponential", "constant"))
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1


@dataclass
class CachingConfig:
    max_cache_size: int = 1000
    max_memory_mb: float = 2048.0
    storage_precision: str = choice("fp16", precision.spellings(precision.CACHE_STORAGE))
    spill_dir: str | None = None
    prefetch: int = 2


@dataclass
class CheckpointConfig:
    enabled: bool = True
    dir: str = "checkpoints"
    every_steps: int = 0
    keep_last: int = 2


@dataclass
class DistributedConfig:
    """Data-parallel training on ``torch.distributed`` (used when the run is launched with
    ``torchrun`` and ``WORLD_SIZE`` > 1; a single process ignores it).

    ``strategy``: ``ddp`` (each rank holds the whole rack; gradients of the stage's trainable
    part are all-reduced), ``fsdp`` (FSDP2 ``fully_shard`` of the trainable part, the frozen trunk
    replicated) or ``none`` (refuse to run on more than one process). ``backend``: ``auto``
    (``nccl`` on CUDA, ``gloo`` on CPU), ``gloo`` or ``nccl``. ``timeout_s``: how long a
    collective (or a barrier waiting for a checkpoint) may wait before the job fails.
    ``training.batch_size`` is the global batch: each of the W ranks reads batch_size / W."""

    strategy: str = choice("ddp", ("none", "ddp", "fsdp"))
    backend: str = choice("auto", ("auto", "gloo", "nccl"))
    timeout_s: float = 600.0


@dataclass
class TrainingConfig:
    mode: str = choice(
        "layerwise", ("layerwise", "blockwise", "stackwise", "rackwise", "fused", "end_to_end")
    )
    block_size: int = 4
    fusion_mode: str = choice("frozen", ("frozen", "trainable", "qlora"))
    total_blocks: int = 2
    learning_rate: float = 1e-4
    batch_size: int = 8
    max_steps: int = 1000
    qlora_enabled: bool = True
    quantization_type: str = choice("fp16", precision.spellings(precision.TRUNK_STORAGE))
    quantization_enabled: bool = False
    time_step_masking: bool = True
    seq_len: int = 256
    device: str = choice("auto", ("auto", "cpu", "cuda"))
    dtype: str = choice("auto", ("auto", *precision.spellings(precision.FLOAT)))
    autocast: bool = False
    seed: int = 42
    log_every: int = 10
    eval_every: int = 200
    eval_max_tokens: int | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    qlora: QLoRAConfig = field(default_factory=QLoRAConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    caching: CachingConfig = field(default_factory=CachingConfig)
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run_id: str | None = None
    # A local Hugging Face Llama folder or Llama GGUF file whose blocks become the trunk
    # (stackwise.model.hf_init): new stacks are appended to the pretrained model.
    init_from: str | None = None


# ---- data -------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    corpus: str = "shakespeare"
    tokenizer: str = "gpt2"
    val_fraction: float = 0.1
    seq_len: int | None = None
    text_field: str = "text"


# ---- presets and aliases ----------------------------------------------------------------------

_ATTENTION_KEYS = ("attention_type", "attention_mode", "use_rope", "n_kv_heads", "rope_theta")

# Short spellings accepted in YAML and overrides.
KEY_ALIASES = {
    "training.lr": "training.learning_rate",
    "training.steps": "training.max_steps",
    "model.layers": "model.n_layers",
}


def _resolve_aliases(raw: dict[str, Any], written_as: dict[str, str]) -> dict[str, Any]:
    for alias, target in KEY_ALIASES.items():
        a_sec, a_key = alias.split(".")
        t_sec, t_key = target.split(".")
        sec = raw.get(a_sec)
        if isinstance(sec, dict) and a_key in sec:
            if t_key in raw.get(t_sec, {}):
                raise ConfigurationError(f"both {alias} and {target} are set; keep one", alias)
            raw.setdefault(t_sec, {})[t_key] = sec.pop(a_key)
            written_as[target] = alias
    return raw


def _apply_preset(model: dict[str, Any]) -> None:
    """Expand ``attention_preset`` and ``attention_custom`` into the model's own keys. A key the
    model section sets itself wins over the preset; ``attention_custom`` (read with any preset)
    also wins over the preset, and may not contradict a key the model section sets."""
    preset = model.get("attention_preset")
    custom = model.get("attention_custom")
    if preset is not None and preset not in ATTENTION_PRESETS:
        raise ConfigurationError(
            f"{preset!r} is not one of {sorted(ATTENTION_PRESETS)}", "model.attention_preset"
        )
    if preset == "custom" and not isinstance(custom, dict):
        raise ConfigurationError(
            "attention_preset 'custom' needs an attention_custom mapping of "
            f"{list(_ATTENTION_KEYS)}",
            "model.attention_custom",
        )
    if custom is not None and not isinstance(custom, dict):
        raise ConfigurationError(
            f"expected a mapping of {list(_ATTENTION_KEYS)}, got {custom!r}",
            "model.attention_custom",
        )
    settings = dict(ATTENTION_PRESETS.get(preset, {})) if preset is not None else {}
    n_heads = model.get("n_heads", ModelConfig.n_heads)
    if preset == "efficient_gqa" and "n_kv_heads" not in model:
        if isinstance(n_heads, int) and n_heads % 4 == 0:
            settings["n_kv_heads"] = n_heads // 4
    if preset in ("gpt_style", "bert_style"):
        # As in the original layout, fewer key/value heads than query heads means grouped
        # (GQA) heads within the preset's multi-head attention.
        n_kv = model.get("n_kv_heads")
        if isinstance(n_kv, int) and isinstance(n_heads, int) and 0 < n_kv < n_heads:
            settings["attention_type"] = "gqa"
    for key, value in (custom or {}).items():
        if key not in _ATTENTION_KEYS:
            raise ConfigurationError(
                f"unknown key; attention_custom takes {list(_ATTENTION_KEYS)}",
                f"model.attention_custom.{key}",
            )
        if key in model and model[key] != value:
            raise ConfigurationError(
                f"{value!r} contradicts model.{key}={model[key]!r}; keep one",
                f"model.attention_custom.{key}",
            )
        settings[key] = value
    for key, value in settings.items():
        model.setdefault(key, value)


def _derive_n_layers(model: dict[str, Any]) -> None:
    """The original layout gives the depth as ``architecture`` alone (n_layers deprecated
    there): n_layers is then n_stacks x blocks_per_stack."""
    arch = model.get("architecture")
    if "n_layers" in model or not isinstance(arch, dict):
        return
    n_stacks = arch.get("n_stacks", ArchitectureConfig.n_stacks)
    per_stack = arch.get("blocks_per_stack", ArchitectureConfig.blocks_per_stack)
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n_stacks, per_stack)):
        model["n_layers"] = n_stacks * per_stack


def _build(cls: type, raw: dict[str, Any], written_as: dict[str, str]) -> Any:
    """``_schema.from_dict``, reporting a key under the name the file wrote it with."""
    try:
        return _schema.from_dict(cls, raw)
    except ConfigurationError as exc:
        if exc.key is None or exc.key not in written_as:
            raise
        message = str(exc).removeprefix(f"{exc.key}: ")
        raise ConfigurationError(message, written_as[exc.key]) from None


@dataclass
class StackWiseConfig:
    """The whole configuration: ``model``, ``training``, ``data``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, data: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()
    ) -> StackWiseConfig:
        """Build from plain data (as YAML loads it), then apply ``key.sub=value`` overrides."""
        raw = copy.deepcopy(data) if data else {}
        if not isinstance(raw, dict):
            raise ConfigurationError(
                f"the configuration must be a mapping, got {type(raw).__name__}"
            )
        override_names: dict[str, str] = {}
        for item in overrides:
            key, sep, text = str(item).partition("=")
            if not sep or not key.strip():
                raise ConfigurationError(f"override {item!r} is not of the form key.sub=value")
            key = key.strip()
            if key in KEY_ALIASES:
                override_names[KEY_ALIASES[key]] = key
                key = KEY_ALIASES[key]
            _schema.set_dotted(raw, key, _schema.yaml_load(text) if text.strip() else None)
        check_removed(raw)
        raw, written_as = translate_original_layout(raw)
        written_as.update(override_names)
        raw = _resolve_aliases(raw, written_as)
        if isinstance(raw.get("model"), dict):
            _apply_preset(raw["model"])
            _derive_n_layers(raw["model"])
        config = _build(cls, raw, written_as)
        config._written_as = written_as
        return config

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()
    ) -> StackWiseConfig:
        """Load a YAML file (``1e-4`` reads as a number) and apply ``overrides``."""
        p = Path(path)
        if not p.is_file():
            raise ConfigurationError(f"config file {p} does not exist")
        try:
            data = _schema.yaml_load(p.read_text(encoding="utf-8"))
        except ConfigurationError as exc:
            raise ConfigurationError(f"{p}: {exc}") from None
        except Exception as exc:  # yaml.YAMLError and decoding errors
            raise ConfigurationError(f"{p} is not valid YAML: {exc}") from exc
        if data is None:
            raise ConfigurationError(
                f"{p} is empty (or holds only comments): give at least one section "
                "(model, training, data); `stackwise config reference` lists every key"
            )
        return cls.from_dict(data, overrides)

    # -- output ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :meth:`from_dict` turns back into an equal config."""
        return _schema.to_dict(self)

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """The YAML text; written atomically to ``path`` when given."""
        text = _schema.yaml_dump(self.to_dict())
        if path is not None:
            atomic_write_text(path, text)
        return text

    def validate(self) -> StackWiseConfig:
        """Check every value and cross-field rule; raise ConfigurationError naming the first
        offending dotted key (all problems are listed in the message). Returns self."""
        validate_config(self, getattr(self, "_written_as", {}))
        return self

    @property
    def effective_seq_len(self) -> int:
        return self.data.seq_len or self.training.seq_len


__all__ = [
    "ArchitectureConfig",
    "ConfigurationError",
    "ModelError",
    "QuantizationError",
    "TrainingError",
    "CachingConfig",
    "DistributedConfig",
    "CheckpointConfig",
    "DataConfig",
    "KernelAttentionConfig",
    "MLAConfig",
    "MaskingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ProgressiveConfig",
    "QLoRAConfig",
    "StackWiseConfig",
    "TokenizerEmbeddingConfig",
    "TrainingConfig",
]
