"""Grow a pretrained model: ``training.init_from: PATH`` (a local Hugging Face Llama folder or a
Llama GGUF file) puts the imported blocks in the trunk and appends new stacks to it.

    config = StackWiseConfig.from_yaml("grow.yaml")
    apply_init_from(config)                       # imports; the model section follows it
    builder = ProgressiveRackBuilder(config)
    seed_trunk(builder)                           # trunk stacks + embeddings, norm and head

The imported model decides every model key that changes its math (widths, heads, RoPE, norm,
vocabulary, tied head, context length); a key the configuration sets to another value than both
its default and the imported one is a :class:`ConfigurationError`, never silently replaced.
``model.architecture.blocks_per_stack`` cuts the pretrained layers into trunk stacks and sizes
the new ones; ``training.progressive.target_stacks`` counts all stacks, trunk included, and must
exceed the trunk (``model.n_layers`` and ``architecture.n_stacks`` follow it).
``data.tokenizer`` becomes the pretrained tokenizer. With ``new_stack_init: auto`` (the default)
new stacks start as the identity (LLaMA Pro's block expansion), so the grown rack starts with
the base model's logits. The trunk is stored at the trunk precision
(``training.quantization_enabled`` / ``quantization_type``, e.g. NF4) once the first new stack
trains.
"""

from __future__ import annotations

import dataclasses

from stackwise.exceptions import ConfigurationError
from stackwise.model.hf import PretrainedModel, load_pretrained

# Model keys the pretrained model decides.
IMPORTED_KEYS = (
    "vocab_size",
    "d_model",
    "n_heads",
    "n_kv_heads",
    "d_ff",
    "attention_type",
    "attention_mode",
    "use_rope",
    "tie_embeddings",
    "rope_theta",
    "max_seq_len",
    "norm",
    "norm_eps",
    "head_dim",
    "attention_preset",
    "attention_custom",
)


def _take(section, name: str, theirs, default, where: str, source: str) -> None:
    mine = getattr(section, name)
    if mine != theirs and mine != default:
        raise ConfigurationError(
            f"{mine!r} differs from {theirs!r}, the value training.init_from ({source}) "
            "implies; remove the key or set it to that value",
            where,
        )
    setattr(section, name, theirs)


def merge_config(config, pretrained: PretrainedModel) -> None:
    """Make ``config`` describe the pretrained trunk plus the stacks to append (in place)."""
    from stackwise.config.base import DataConfig, ModelConfig

    src = str(pretrained.source)
    model, imported, defaults = config.model, pretrained.rack.config, ModelConfig()
    for name in IMPORTED_KEYS:
        _take(model, name, getattr(imported, name), getattr(defaults, name), f"model.{name}", src)
    te = model.tokenizer_embedding
    if dataclasses.asdict(te) != dataclasses.asdict(defaults.tokenizer_embedding):
        if dataclasses.asdict(te) != dataclasses.asdict(imported.tokenizer_embedding):
            raise ConfigurationError(
                "the embedding table comes from training.init_from; remove this section",
                "model.tokenizer_embedding",
            )
    model.tokenizer_embedding = dataclasses.replace(imported.tokenizer_embedding)
    prog = config.training.progressive
    if prog.building_mode != "append":
        raise ConfigurationError(
            "training.init_from grows a pretrained model by appending stacks; use 'append'",
            "training.progressive.building_mode",
        )
    bps = model.architecture.blocks_per_stack
    trunk = len(pretrained.rack.stacks)
    if prog.target_stacks <= trunk:
        raise ConfigurationError(
            f"{prog.target_stacks} does not exceed the {trunk} stacks of {bps} blocks imported "
            f"from {src} (the trunk); {trunk + 1} appends one stack",
            "training.progressive.target_stacks",
        )
    # The rack's size follows the plan (so a resumed run may raise target_stacks).
    model.architecture.n_stacks = prog.target_stacks
    model.n_layers = prog.target_stacks * bps
    if pretrained.tokenizer is None:
        raise ConfigurationError(f"{src} has no tokenizer (tokenizer.json)", "training.init_from")
    data_default = DataConfig().tokenizer
    _take(config.data, "tokenizer", pretrained.tokenizer.name, data_default, "data.tokenizer", src)


# The model apply_init_from imported, kept for seed_trunk (which takes it out again).
_IMPORTED: dict[tuple[str, int], PretrainedModel] = {}


def _key(config) -> tuple[str, int]:
    return str(config.training.init_from), config.model.architecture.blocks_per_stack


def apply_init_from(config) -> PretrainedModel | None:
    """Import ``training.init_from`` (None when unset) and fit ``config`` to it."""
    if not config.training.init_from:
        return None
    pretrained = load_pretrained(
        config.training.init_from, blocks_per_stack=config.model.architecture.blocks_per_stack
    )
    merge_config(config, pretrained)
    _IMPORTED.clear()
    _IMPORTED[_key(config)] = pretrained
    return pretrained


def seed_trunk(builder, pretrained: PretrainedModel | None = None) -> bool:
    """Put the pretrained stacks, embeddings, final norm and head of ``training.init_from``
    into an empty builder's rack (``pretrained``: the imported model, default the one
    :func:`apply_init_from` imported for this configuration); the trunk is converted to the
    trunk precision when the first new stack trains. Returns False without init_from."""
    config = builder.config
    if pretrained is None:
        if not config.training.init_from:
            return False
        pretrained = _IMPORTED.pop(_key(config), None)
        if pretrained is None:
            pretrained = load_pretrained(
                config.training.init_from,
                blocks_per_stack=config.model.architecture.blocks_per_stack,
            )
    rack, source = builder.rack, pretrained.rack
    rack.lexical.load_state_dict(source.lexical.state_dict())
    rack.final_norm.load_state_dict(source.final_norm.state_dict())
    builder.load_trunk(list(source.stacks), trunk_precision(config.training))
    return True


def trunk_precision(training) -> str:
    """The storage precision of trunk stacks (as the progressive trainer reads it)."""
    if not training.quantization_enabled:
        return "full"
    q = training.quantization_type
    return {"fp32": "full", "fp16": "half", "fp8_e4m3": "fp8", "fp8_e5m2": "fp8"}.get(q, q)


__all__ = ["IMPORTED_KEYS", "apply_init_from", "merge_config", "seed_trunk"]
