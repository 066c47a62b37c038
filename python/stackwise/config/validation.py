"""Validation of a :class:`~stackwise.config.base.StackWiseConfig`: allowed values, ranges and
cross-field rules. Each problem names its dotted key, the bad value and what is allowed.

The allowed values of a key are declared once, on its dataclass field
(:func:`stackwise.config._schema.choice`); :func:`_check_choices` walks the fields and checks
them. This module does not import :mod:`stackwise.config.base` (which imports it): it reads the
configuration through its attributes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from stackwise.config._schema import field_choices
from stackwise.exceptions import ConfigurationError

# Upper bounds on sizes, named in the configuration reference. Beyond them a value is a typo
# that would fail late (an OverflowError, or an allocation of terabytes), not a model.
SIZE_LIMITS: dict[str, int] = {
    "model.vocab_size": 2**31 - 1,
    "model.d_model": 2**20,
    "model.n_layers": 2**16,
    "model.n_heads": 2**16,
    "model.n_kv_heads": 2**16,
    "model.d_ff": 2**22,
    "model.max_seq_len": 2**24,
    "training.batch_size": 2**24,
    "training.seq_len": 2**24,
}
# The most parameters a rack may hold (about 1.1e12; the largest dense models are below this).
MAX_PARAMETERS = 2**40


class _Checker:
    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def fail(self, key: str, message: str) -> None:
        self.problems.append((key, message))

    def choice(self, key: str, value: Any, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            self.fail(key, f"{value!r} is not one of {list(allowed)}")

    def positive(self, key: str, value: float) -> None:
        if not value > 0:
            self.fail(key, f"{value!r} must be > 0")

    def non_negative(self, key: str, value: float) -> None:
        if not value >= 0:
            self.fail(key, f"{value!r} must be >= 0")

    def fraction(self, key: str, value: float, *, upper_open: bool = False) -> None:
        ok = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
        if not ok:
            bound = "[0, 1)" if upper_open else "[0, 1]"
            self.fail(key, f"{value!r} must be in {bound}")


def _check_choices(c: _Checker, section: Any, prefix: str) -> None:
    """Every field declared with allowed values, in every section, in field order."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = f"{prefix}.{f.name}"
        allowed = field_choices(f)
        if allowed is not None:
            c.choice(key, value, allowed)
        elif dataclasses.is_dataclass(value):
            _check_choices(c, value, key)
        elif isinstance(value, float) and not math.isfinite(value):
            c.fail(key, f"must be a finite number, got {value!r}")
        elif isinstance(value, tuple):
            for i, v in enumerate(value):
                if isinstance(v, float) and not math.isfinite(v):
                    c.fail(f"{key}[{i}]", f"must be a finite number, got {v!r}")
        limit = SIZE_LIMITS.get(key)
        if limit is not None and isinstance(value, int) and value > limit:
            c.fail(key, f"{value} exceeds the limit of {limit}")


def _parameter_estimate(m: Any) -> int:
    """Roughly the parameters of the rack: embeddings, position table, attention and SwiGLU."""
    d = m.d_model
    table = m.vocab_size * d + (0 if m.use_rope else m.max_seq_len * d)
    return table + m.n_layers * (4 * d * d + 3 * d * m.d_ff)


def _check_model(c: _Checker, m) -> None:
    for key in (
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "d_ff",
        "max_seq_len",
    ):
        c.positive(f"model.{key}", getattr(m, key))
    c.positive("model.norm_eps", m.norm_eps)
    c.fraction("model.dropout", m.dropout, upper_open=True)
    c.positive("model.rope_theta", m.rope_theta)
    if all(0 < getattr(m, k) <= SIZE_LIMITS[f"model.{k}"] for k in ("vocab_size", "d_model")):
        params = _parameter_estimate(m)
        if params > MAX_PARAMETERS:
            c.fail(
                "model.d_model",
                f"the rack would hold about {params:.3g} parameters, more than the limit of "
                f"{MAX_PARAMETERS:.3g}",
            )
    if m.head_dim is not None:
        c.positive("model.head_dim", m.head_dim)
        if m.attention_type not in ("standard", "mha", "gqa"):
            c.fail(
                "model.head_dim",
                f"an explicit head_dim is supported for attention_type standard, mha or gqa, "
                f"not {m.attention_type!r}",
            )
    elif m.n_heads > 0 and m.d_model > 0 and m.d_model % m.n_heads:
        c.fail("model.d_model", f"{m.d_model} is not divisible by model.n_heads={m.n_heads}")
    if m.n_kv_heads > 0 and m.n_heads > 0:
        if m.n_kv_heads > m.n_heads:
            c.fail("model.n_kv_heads", f"{m.n_kv_heads} exceeds model.n_heads={m.n_heads}")
        elif m.n_heads % m.n_kv_heads:
            c.fail(
                "model.n_heads",
                f"{m.n_heads} is not divisible by model.n_kv_heads="
                f"{m.n_kv_heads} (each KV head serves a whole group of query heads)",
            )
    if m.attention_type in ("standard", "mha") and m.n_kv_heads != m.n_heads:
        c.fail(
            "model.n_kv_heads",
            f"{m.n_kv_heads} != n_heads={m.n_heads} with attention_type "
            f"{m.attention_type!r}; use 'gqa' for grouped heads",
        )
    head_dim = m.head_dim or (m.d_model // m.n_heads if m.n_heads > 0 else 0)
    if m.use_rope and head_dim % 2:
        c.fail("model.use_rope", f"RoPE needs an even head dim, got {head_dim}")
    arch = m.architecture
    c.positive("model.architecture.n_stacks", arch.n_stacks)
    c.positive("model.architecture.blocks_per_stack", arch.blocks_per_stack)
    if arch.n_stacks * arch.blocks_per_stack != m.n_layers:
        c.fail(
            "model.n_layers",
            f"{m.n_layers} != architecture.n_stacks x blocks_per_stack = "
            f"{arch.n_stacks} x {arch.blocks_per_stack}",
        )
    if m.attention_type in ("mla", "mlgka"):
        mla = m.mla
        c.positive("model.mla.kv_rank", mla.kv_rank)
        c.non_negative("model.mla.q_rank", mla.q_rank)
        if mla.rope_head_dim < 0 or mla.rope_head_dim % 2:
            c.fail("model.mla.rope_head_dim", f"{mla.rope_head_dim} must be even and >= 0")
        if mla.kv_rank > m.d_model > 0:
            c.fail(
                "model.mla.kv_rank",
                f"{mla.kv_rank} exceeds d_model={m.d_model}: the latent must compress",
            )
        if mla.v_head_dim is not None:
            c.positive("model.mla.v_head_dim", mla.v_head_dim)
    if m.attention_type in ("kernel", "mlgka"):
        c.positive("model.kernel.kernel_dim", m.kernel.kernel_dim)
    te = m.tokenizer_embedding
    if te.embedding_dim is not None:
        c.positive("model.tokenizer_embedding.embedding_dim", te.embedding_dim)
        if te.embedding_dim != m.d_model and not te.adapter:
            c.fail(
                "model.tokenizer_embedding.adapter",
                f"the pretrained embedding has dim "
                f"{te.embedding_dim} but d_model={m.d_model}; set adapter: true or match them",
            )
    if te.freeze_embeddings and te.embedding_option == "learned":
        c.fail(
            "model.tokenizer_embedding.freeze_embeddings",
            "a 'learned' table that is frozen "
            "never trains; use embedding_option 'embed_tokens' or freeze_embeddings: false",
        )


def _check_training(c: _Checker, t, model) -> None:
    for key in ("block_size", "total_blocks", "batch_size", "seq_len", "log_every", "eval_every"):
        c.positive(f"training.{key}", getattr(t, key))
    c.positive("training.learning_rate", t.learning_rate)
    if t.eval_max_tokens is not None:
        c.positive("training.eval_max_tokens", t.eval_max_tokens)
    c.non_negative("training.max_steps", t.max_steps)
    if t.seq_len > model.max_seq_len:
        c.fail("training.seq_len", f"{t.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    o = t.optimizer
    for i, b in enumerate(o.betas):
        c.fraction(f"training.optimizer.betas[{i}]", b, upper_open=True)
    c.positive("training.optimizer.eps", o.eps)
    c.non_negative("training.optimizer.weight_decay", o.weight_decay)
    c.non_negative("training.optimizer.warmup_steps", o.warmup_steps)
    c.non_negative("training.optimizer.grad_clip", o.grad_clip)
    c.fraction("training.optimizer.min_lr_ratio", o.min_lr_ratio)
    c.positive("training.optimizer.grad_accumulation", o.grad_accumulation)
    # A warmup longer than a stage is not refused: each stage shortens it (training/optim.py,
    # effective_warmup) and `stackwise train` says so, so smoke runs of any config just work.
    p = t.progressive
    c.positive("training.progressive.target_stacks", p.target_stacks)
    c.positive("training.progressive.epochs_per_stack", p.epochs_per_stack)
    c.non_negative("training.progressive.consolidation_steps", p.consolidation_steps)
    if p.consolidation_steps and t.max_steps > 0 and p.consolidation_steps >= t.max_steps:
        c.fail(
            "training.progressive.consolidation_steps",
            f"{p.consolidation_steps} leaves no step of training.max_steps={t.max_steps} "
            "for the stages",
        )
    if p.consolidation_steps and (p.building_mode != "append" or p.training_objective != "clm"):
        c.fail(
            "training.progressive.consolidation_steps",
            "the consolidation phase is implemented for building_mode 'append' with the "
            "'clm' objective",
        )
    if p.steps_per_stack is not None:
        c.positive("training.progressive.steps_per_stack", p.steps_per_stack)
    c.positive("training.progressive.stage_lr_scale", p.stage_lr_scale)
    if p.noise_ranges != "none" and p.training_objective == "clm":
        c.fail(
            "training.progressive.noise_ranges",
            f"{p.noise_ranges!r} gives each stage a range of mask ratios: use the 'diffusion' "
            "or 'mlm' objective, or noise_ranges 'none'",
        )
    if p.noise_ranges == "equal_mass" and t.masking.min_fraction <= 0.0:
        c.fail(
            "training.progressive.noise_ranges",
            "'equal_mass' splits [min_fraction, max_fraction] by equal mass of 1/t: "
            "training.masking.min_fraction must be > 0",
        )
    if p.time_interpretation == "input" and p.training_objective == "clm":
        c.fail(
            "training.progressive.time_interpretation",
            "'input' draws a noise level per sample and masks the input at it: use the "
            "'diffusion' or 'mlm' objective, or time_interpretation 'depth'",
        )
    if p.target_stacks > model.architecture.n_stacks > 0:
        c.fail(
            "training.progressive.target_stacks",
            f"{p.target_stacks} exceeds model.architecture.n_stacks={model.architecture.n_stacks}",
        )
    if p.training_objective in ("mlm", "diffusion") and model.attention_mode == "causal":
        c.fail(
            "model.attention_mode",
            f"'causal' cannot see the right context that the "
            f"{p.training_objective!r} objective masks; use 'bidirectional'",
        )
    if p.training_objective == "clm" and model.attention_mode == "bidirectional":
        c.fail(
            "model.attention_mode",
            "'bidirectional' lets the 'clm' objective see the next "
            "token it must predict; use 'causal'",
        )
    if p.building_mode == "prepend" and p.training_objective == "clm" and t.time_step_masking:
        c.fail(
            "training.progressive.training_objective",
            "prepend ('depth as time') trains on "
            "masked input: use 'diffusion' or 'mlm', or set training.time_step_masking: false",
        )
    q = t.qlora
    if t.qlora_enabled or p.trunk_strategy == "qlora" or q.new_stack_lora:
        c.positive("training.qlora.rank", q.rank)
        c.positive("training.qlora.alpha", q.alpha)
        c.positive("training.qlora.lr", q.lr)
        c.fraction("training.qlora.dropout", q.dropout, upper_open=True)
        if q.progressive_rank:
            if not 0 < q.rank_decay <= 1:
                c.fail("training.qlora.rank_decay", f"{q.rank_decay!r} must be in (0, 1]")
            if not 0 < q.min_rank <= q.rank:
                c.fail("training.qlora.min_rank", f"{q.min_rank} must be in [1, rank={q.rank}]")
    mk = t.masking
    c.fraction("training.masking.min_fraction", mk.min_fraction)
    c.fraction("training.masking.max_fraction", mk.max_fraction)
    if mk.min_fraction > mk.max_fraction:
        c.fail(
            "training.masking.min_fraction",
            f"{mk.min_fraction} exceeds training.masking.max_fraction={mk.max_fraction}",
        )
    c.fraction("training.masking.mask_token_prob", mk.mask_token_prob)
    c.fraction("training.masking.random_token_prob", mk.random_token_prob)
    if mk.mask_token_prob + mk.random_token_prob > 1:
        c.fail(
            "training.masking.random_token_prob",
            f"mask_token_prob + random_token_prob = "
            f"{mk.mask_token_prob + mk.random_token_prob} exceeds 1",
        )
    ca = t.caching
    c.positive("training.caching.max_cache_size", ca.max_cache_size)
    c.positive("training.caching.max_memory_mb", ca.max_memory_mb)
    c.non_negative("training.caching.prefetch", ca.prefetch)
    ck = t.checkpointing
    c.non_negative("training.checkpointing.every_steps", ck.every_steps)
    c.positive("training.checkpointing.keep_last", ck.keep_last)
    dd = t.distributed
    c.positive("training.distributed.timeout_s", dd.timeout_s)
    if dd.backend == "nccl" and t.device == "cpu":
        c.fail(
            "training.distributed.backend",
            "'nccl' moves tensors between GPUs only; use 'gloo' (or 'auto') with device 'cpu'",
        )


def _check_data(c: _Checker, d) -> None:
    if not d.corpus:
        c.fail("data.corpus", "must name a corpus ('shakespeare') or a local path")
    if not 0.0 < d.val_fraction < 1.0:
        c.fail("data.val_fraction", f"{d.val_fraction!r} must be in (0, 1)")
    if d.seq_len is not None:
        c.positive("data.seq_len", d.seq_len)


def validate_config(config: Any, written_as: dict[str, str] | None = None) -> None:
    """Raise ConfigurationError listing every problem of a ``StackWiseConfig``, keyed by the
    first. ``written_as`` maps a key to the name the file wrote it with (the original layout's
    names, :mod:`stackwise.config.legacy`); problems are reported under that name."""
    c = _Checker()
    for name in ("model", "training", "data"):
        _check_choices(c, getattr(config, name), name)
    _check_model(c, config.model)
    _check_training(c, config.training, config.model)
    _check_data(c, config.data)
    if c.problems:
        names = written_as or {}
        c.problems = [(names.get(k, k), m) for k, m in c.problems]
        key, message = c.problems[0]
        rest = "".join(f"\n  {k}: {m}" for k, m in c.problems[1:])
        more = f" (and {len(c.problems) - 1} more:{rest})" if rest else ""
        raise ConfigurationError(message + more, key)
