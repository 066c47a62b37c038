"""Every key of the configuration reference is read: changing it changes what a run does.

The test walks the generated reference (``stackwise config reference``, docs/configuration.md) and
for each key trains a tiny run twice, with and without the change, on a small local corpus,
through the same path ``stackwise train`` takes (data loaders, the progressive or the
hierarchical trainer, metrics, checkpoints). A run's fingerprint is everything observable: the
first batch, the losses, learning rates and events, the final weights, the files written
(checkpoints, spill files, weight backups, metrics). A change that is refused counts as a change
only where the key is a bound (``model.max_seq_len``) or a device (``training.device``).

A key that needs a resource a tiny run cannot have (torchrun, a pretrained model) is listed in
``ELSEWHERE`` with the test that shows it is read. A key in neither table fails the test, so a
new key cannot be added without saying how it changes a run.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from stackwise.config.base import StackWiseConfig
from stackwise.run.reference import config_reference

# (context overrides that make the key matter, the change)
STEPS3 = ["training.progressive.steps_per_stack=3"]
QLORA = ["training.progressive.trunk_strategy=qlora", "training.quantization_type=nf4"]
THREE = [
    "model.n_layers=6",
    "model.architecture.n_stacks=3",
    "training.progressive.target_stacks=3",
]
MLM = ["training.progressive.training_objective=mlm", "model.attention_mode=bidirectional"]
DIFF = ["training.progressive.training_objective=diffusion", "model.attention_mode=bidirectional"]
STAGED = [*DIFF, "training.time_step_masking=true"]  # a mask ratio per stage
HIER = ["training.progressive.enabled=false"]
MLA = ["model.attention_type=mla", "model.mla.rope_head_dim=4", "model.mla.kv_rank=16"]
FUSED = [*HIER, "training.mode=fused", "training.block_size=1"]
SPILL = ["training.caching.spill_dir=spill", "training.caching.max_cache_size=1"]
CASES: dict[str, tuple[list[str], list[str]]] = {
    "model.vocab_size": ([], ["model.vocab_size=300"]),
    "model.d_model": ([], ["model.d_model=48"]),
    "model.n_layers": (HIER, ["model.n_layers=6", "model.architecture.n_stacks=3"]),
    "model.n_heads": ([], ["model.n_heads=2", "model.n_kv_heads=2"]),
    "model.n_kv_heads": (["model.attention_type=gqa"], ["model.n_kv_heads=2"]),
    "model.d_ff": ([], ["model.d_ff=96"]),
    "model.attention_type": ([], ["model.attention_type=kernel"]),
    "model.attention_mode": (MLM, ["model.attention_mode=causal"]),
    "model.use_rope": ([], ["model.use_rope=false"]),
    "model.tie_embeddings": ([], ["model.tie_embeddings=false"]),
    "model.attention_preset": ([], ["model.attention_preset=kernel_attention"]),
    "model.attention_custom": ([], ["model.attention_custom={attention_type: kernel}"]),
    "model.rope_theta": ([], ["model.rope_theta=100.0"]),
    "model.max_seq_len": ([], ["model.max_seq_len=8"]),
    "model.norm": ([], ["model.norm=layernorm"]),
    "model.norm_eps": ([], ["model.norm_eps=0.5"]),
    "model.dropout": ([], ["model.dropout=0.3"]),
    "model.freeze_up_proj": ([], ["model.freeze_up_proj=true"]),
    "model.head_dim": ([], ["model.head_dim=4"]),
    "model.architecture.n_stacks": (HIER, ["model.architecture.n_stacks=3", "model.n_layers=6"]),
    "model.architecture.blocks_per_stack": (
        [],
        ["model.architecture.blocks_per_stack=1", "model.n_layers=2"],
    ),
    "model.mla.q_rank": (MLA, ["model.mla.q_rank=8"]),
    "model.mla.kv_rank": (MLA, ["model.mla.kv_rank=8"]),
    "model.mla.rope_head_dim": (MLA, ["model.mla.rope_head_dim=2"]),
    "model.mla.v_head_dim": (MLA, ["model.mla.v_head_dim=4"]),
    "model.kernel.kernel_type": (
        ["model.attention_type=kernel"],
        ["model.kernel.kernel_type=relu"],
    ),
    "model.kernel.kernel_dim": (
        ["model.attention_type=kernel", "model.kernel.kernel_type=softmax"],
        ["model.kernel.kernel_dim=8"],
    ),
    "model.kernel.seed": (
        ["model.attention_type=kernel", "model.kernel.kernel_type=softmax"],
        ["model.kernel.seed=7"],
    ),
    "training.mode": (HIER, ["training.mode=stackwise"]),
    "training.block_size": ([*HIER, "training.mode=blockwise"], ["training.block_size=1"]),
    "training.fusion_mode": (FUSED, ["training.fusion_mode=trainable"]),
    "training.learning_rate": ([], ["training.learning_rate=0.01"]),
    "training.batch_size": ([], ["training.batch_size=2"]),
    "training.max_steps": ([], ["training.max_steps=3"]),
    "training.qlora_enabled": (
        ["training.qlora_enabled=false", "training.qlora.rank=0"],
        ["training.qlora_enabled=true"],
    ),
    "training.quantization_type": (
        ["training.quantization_enabled=true"],
        ["training.quantization_type=int8"],
    ),
    "training.quantization_enabled": ([], ["training.quantization_enabled=true"]),
    "training.time_step_masking": (
        [*DIFF, *THREE, "training.time_step_masking=false"],
        ["training.time_step_masking=true"],
    ),
    "training.seq_len": ([], ["training.seq_len=8"]),
    "training.device": ([], ["training.device=cuda"]),
    "training.dtype": ([], ["training.dtype=bf16"]),
    "training.autocast": ([], ["training.autocast=true"]),
    "training.seed": ([], ["training.seed=1"]),
    "training.log_every": ([], ["training.log_every=2"]),
    "training.eval_every": ([], ["training.eval_every=1"]),
    "training.eval_max_tokens": (["training.eval_every=1"], ["training.eval_max_tokens=1"]),
    "training.run_id": (FUSED, ["training.run_id=other"]),
    "training.optimizer.name": ([], ["training.optimizer.name=sgd"]),
    "training.optimizer.betas": ([], ["training.optimizer.betas=[0.5, 0.6]"]),
    "training.optimizer.eps": ([], ["training.optimizer.eps=0.1"]),
    "training.optimizer.weight_decay": ([], ["training.optimizer.weight_decay=0.5"]),
    "training.optimizer.momentum": (
        ["training.optimizer.name=sgd"],
        ["training.optimizer.momentum=0.0"],
    ),
    # 1 step of warmup fits the stages of 2 steps (a warmup as long as a stage is shortened).
    "training.optimizer.warmup_steps": ([], ["training.optimizer.warmup_steps=1"]),
    "training.optimizer.schedule": (STEPS3, ["training.optimizer.schedule=linear"]),
    "training.optimizer.min_lr_ratio": ([], ["training.optimizer.min_lr_ratio=0.9"]),
    "training.optimizer.grad_clip": ([], ["training.optimizer.grad_clip=0.001"]),
    "training.optimizer.grad_accumulation": ([], ["training.optimizer.grad_accumulation=2"]),
    "training.progressive.enabled": ([], ["training.progressive.enabled=false"]),
    "training.progressive.building_mode": ([], ["training.progressive.building_mode=prepend"]),
    "training.progressive.target_stacks": ([], ["training.progressive.target_stacks=1"]),
    "training.progressive.trunk_strategy": ([], ["training.progressive.trunk_strategy=qlora"]),
    "training.progressive.cache_activations": (
        [],
        ["training.progressive.cache_activations=false"],
    ),
    "training.progressive.time_interpretation": (
        DIFF,
        ["training.progressive.time_interpretation=input"],
    ),
    "training.progressive.training_objective": (
        MLM,
        ["training.progressive.training_objective=diffusion"],
    ),
    "training.progressive.epochs_per_stack": (
        [
            "training.progressive.steps_per_stack=null",
            "training.max_steps=0",
            "data.val_fraction=0.9",
        ],
        ["training.progressive.epochs_per_stack=2"],
    ),
    "training.progressive.steps_per_stack": ([], ["training.progressive.steps_per_stack=1"]),
    "training.progressive.new_stack_init": ([], ["training.progressive.new_stack_init=identity"]),
    "training.progressive.consolidation_steps": (
        [],
        ["training.progressive.consolidation_steps=1"],
    ),
    "training.progressive.stage_budget": (
        ["training.progressive.steps_per_stack=null", "training.max_steps=6"],
        ["training.progressive.stage_budget=uniform"],
    ),
    "training.progressive.stage_lr_scale": ([], ["training.progressive.stage_lr_scale=1.0"]),
    "training.progressive.noise_ranges": (DIFF, ["training.progressive.noise_ranges=linear"]),
    "training.qlora.rank": (QLORA, ["training.qlora.rank=2"]),
    "training.qlora.alpha": (QLORA, ["training.qlora.alpha=1.0"]),
    "training.qlora.dropout": (QLORA, ["training.qlora.dropout=0.5"]),
    "training.qlora.lr": (QLORA, ["training.qlora.lr=0.05"]),
    "training.qlora.progressive_rank": ([*QLORA, *THREE], ["training.qlora.progressive_rank=true"]),
    "training.qlora.rank_decay": (
        [*QLORA, *THREE, "training.qlora.progressive_rank=true"],
        ["training.qlora.rank_decay=0.25"],
    ),
    "training.qlora.min_rank": (
        [*QLORA, *THREE, "training.qlora.progressive_rank=true", "training.qlora.rank=8"],
        ["training.qlora.min_rank=6"],
    ),
    "training.qlora.new_stack_lora": ([], ["training.qlora.new_stack_lora=true"]),
    "training.masking.min_fraction": (STAGED, ["training.masking.min_fraction=0.4"]),
    "training.masking.max_fraction": (DIFF, ["training.masking.max_fraction=0.5"]),
    "training.masking.schedule": ([*STAGED, *THREE], ["training.masking.schedule=exponential"]),
    "training.masking.mask_token_prob": (MLM, ["training.masking.mask_token_prob=0.5"]),
    "training.masking.random_token_prob": (MLM, ["training.masking.random_token_prob=0.0"]),
    "training.caching.max_cache_size": (
        ["training.caching.spill_dir=spill"],
        ["training.caching.max_cache_size=1"],
    ),
    "training.caching.max_memory_mb": (
        ["training.caching.spill_dir=spill"],
        ["training.caching.max_memory_mb=0.001"],
    ),
    "training.caching.storage_precision": ([], ["training.caching.storage_precision=fp16"]),
    # A spill directory matters once the memory budget is smaller than the cache.
    "training.caching.spill_dir": (
        [],
        ["training.caching.spill_dir=spill", "training.caching.max_cache_size=1"],
    ),
    "training.caching.prefetch": (SPILL, ["training.caching.prefetch=0"]),
    "training.checkpointing.enabled": ([], ["training.checkpointing.enabled=false"]),
    "training.checkpointing.dir": (FUSED, ["training.checkpointing.dir=elsewhere"]),
    "training.checkpointing.every_steps": ([], ["training.checkpointing.every_steps=1"]),
    "training.checkpointing.keep_last": ([], ["training.checkpointing.keep_last=1"]),
    "data.corpus": ([], ["data.corpus=other.txt"]),
    "data.tokenizer": ([], ["data.tokenizer=gpt2", "model.vocab_size=50304"]),
    "data.val_fraction": ([], ["data.val_fraction=0.5"]),
    "data.seq_len": ([], ["data.seq_len=8"]),
    "data.text_field": (
        ["data.corpus=docs.jsonl", "data.text_field=text"],
        ["data.text_field=body"],
    ),
}
# Keys whose change shows only where a tiny run cannot go; each names the test that shows it.
ELSEWHERE = {
    "model.tokenizer_embedding.family": "a pretrained table (embed_tokens): test_ffn_lexical.py",
    "model.tokenizer_embedding.embedding_option": "loads a pretrained table: test_ffn_lexical.py",
    "model.tokenizer_embedding.path": "the pretrained table's file: test_ffn_lexical.py",
    "model.tokenizer_embedding.freeze_embeddings": "a pretrained table's: test_ffn_lexical.py",
    "model.tokenizer_embedding.embedding_dim": "a pretrained table's width: test_ffn_lexical.py",
    "model.tokenizer_embedding.adapter": "a pretrained table's projection: test_ffn_lexical.py",
    "model.tokenizer_embedding.adapter_hidden_dim": "that projection's width: test_ffn_lexical.py",
    "training.total_blocks": "FusionTrainer(config) building its model: test_fusion_trainer.py",
    "training.progressive.trunk_checkpointing": (
        "same numbers, less memory: training/test_consolidation.py (which stacks recompute)"
    ),
    "training.init_from": "a pretrained model folder: run/test_init_from.py",
    "training.distributed.strategy": "torchrun jobs only: training/test_distributed.py",
    "training.distributed.backend": "torchrun jobs only: training/test_distributed.py",
    "training.distributed.timeout_s": "torchrun jobs only: training/test_distributed.py",
}
# A refused change counts as a change for these keys: they bound or place the run, or (for
# qlora_enabled) say which sections are checked.
# model.attention_mode is fixed by the objective for training (the other value is refused); it
# is the rack's own mode for the Python API.
REFUSAL_IS_THE_CHANGE = {"model.max_seq_len", "training.qlora_enabled", "model.attention_mode"}
if not torch.cuda.is_available():
    REFUSAL_IS_THE_CHANGE.add("training.device")  # no GPU: cuda is refused

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60))


def reference_keys() -> list[str]:
    keys = []
    for line in config_reference().splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 2 and cells[1].startswith("`") and cells[1].endswith("`"):
            keys.append(cells[1].strip("`"))
    return keys


def _base() -> list[str]:
    return [
        "model.vocab_size=259",
        "model.d_model=32",
        "model.n_heads=4",
        "model.n_kv_heads=4",
        "model.d_ff=64",
        "model.n_layers=4",
        "model.max_seq_len=32",
        "model.use_rope=true",
        "model.architecture.n_stacks=2",
        "model.architecture.blocks_per_stack=2",
        "training.device=cpu",
        "training.learning_rate=0.003",
        "training.batch_size=4",
        "training.seq_len=16",
        "training.max_steps=8",
        "training.eval_every=2",
        "training.log_every=1",
        "training.time_step_masking=false",
        "training.optimizer.warmup_steps=0",
        "training.progressive.target_stacks=2",
        "training.progressive.steps_per_stack=2",
        "training.caching.storage_precision=as_is",
        "training.checkpointing.dir=ckpt",
        "training.checkpointing.keep_last=5",
        "data.corpus=corpus.txt",
        "data.tokenizer=bytes",
        "data.val_fraction=0.2",
    ]


class _Events:
    """Every event a trainer emits, without wall-clock measurements."""

    TIMING = ("_s", "_ms", "tokens_per_s", "peak_memory_bytes", "cache")

    def __init__(self) -> None:
        self.log: list = []

    def __getattr__(self, name: str):
        if not name.startswith("on_"):
            raise AttributeError(name)

        def record(info):
            kept = {k: v for k, v in info.items() if not k.endswith(self.TIMING)}
            self.log.append((name, json.dumps(kept, sort_keys=True, default=str)))
            cache = info.get("cache")
            if isinstance(cache, dict):
                self.log.append(("cache", cache.get("spills"), cache.get("prefetch_hits")))

        return record


def _files(root: Path) -> list[str]:
    skip = {"corpus.txt", "other.txt", "docs.jsonl"}
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.name not in skip and "token-cache" not in p.parts
    )


def fingerprint(root: Path, overrides: list[str]) -> tuple[str, str | None]:
    """Train the tiny run in ``root`` (the working directory); the hash of what it did, and the
    error that stopped it (None when it ran through)."""
    from stackwise.data import create_data_loaders
    from stackwise.data.tokenizers import get_tokenizer
    from stackwise.run.metrics import MetricsWriter
    from stackwise.run.progress import MetricsCallback
    from stackwise.training import ProgressiveRackBuilder, ProgressiveTrainer, Trainer

    out: list = []
    error = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = StackWiseConfig.from_dict({}, overrides=_base() + overrides).validate()
        tok = get_tokenizer(config.data.tokenizer)
        train, val = create_data_loaders(config, tokenizer=tok)
        first = next(iter(train))
        out += [first["input_ids"].tolist(), len(train.dataset), len(val.dataset)]
        events = _Events()
        writer = MetricsWriter(root / "metrics.jsonl", None)
        steps_done = lambda: sum(h.get("steps", 0) for h in trainer.history)  # noqa: E731
        callbacks = [events, MetricsCallback(writer, config.training.log_every, steps_done)]
        ids = {"mask": tok.mask_token_id, "pad": tok.pad_token_id}
        ids = {k: v for k, v in ids.items() if v is not None}
        torch.manual_seed(config.training.seed)
        if config.training.progressive.enabled:
            builder = ProgressiveRackBuilder(config)
            trainer = ProgressiveTrainer(
                config,
                tokenizer_ids=ids,
                checkpoint_dir=config.training.checkpointing.dir,
                callbacks=callbacks,
            )
            trainer.train_rack(builder, train, eval_loader=val)
            rack = builder.rack
        else:
            trainer = Trainer(config, tokenizer_ids=ids, callbacks=[])
            trainer.callbacks = [events]
            trainer.train(None, train, eval_loader=val)
            rack = trainer.rack
        writer.close()
        out.append(events.log)
        for k, v in sorted(rack.state_dict().items()):
            out.append((k, hashlib.sha256(v.detach().float().contiguous().numpy()).hexdigest()))
        out.append(_files(root))
        out.append((root / "metrics.jsonl").read_text().count("\n"))
    except Exception as exc:  # noqa: BLE001 (a refusal is part of the fingerprint)
        error = f"{type(exc).__name__}: {exc}"
        out.append(("error", error))
    return hashlib.sha256(json.dumps(out, default=str).encode()).hexdigest(), error


def test_every_reference_key_is_covered():
    keys = set(reference_keys())
    assert keys, "the configuration reference lists no key"
    missing = sorted(keys - set(CASES) - set(ELSEWHERE))
    assert not missing, f"keys with no test of what they change: {missing}"
    stale = sorted((set(CASES) | set(ELSEWHERE)) - keys)
    assert not stale, f"keys tested here but not in the reference: {stale}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("every-key")
    return root


def _prepare(root: Path, monkeypatch) -> None:
    monkeypatch.chdir(root)
    monkeypatch.setenv("STACKWISE_CACHE_DIR", str(root / "token-cache"))
    (root / "corpus.txt").write_text(TEXT)
    (root / "other.txt").write_text(TEXT.replace("fox", "cat").upper())
    docs = [{"text": f"doc {i} " + TEXT[:200], "body": f"body {i} " * 30} for i in range(12)]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))


_BASELINES: dict[tuple[str, ...], tuple[str, str | None]] = {}


@pytest.mark.parametrize("key", sorted(CASES))
def test_changing_the_key_changes_the_run(key, tmp_path, monkeypatch):
    context, change = CASES[key]
    assert change, f"{key}: no change to try on this machine"
    base_dir, changed_dir = tmp_path / "base", tmp_path / "changed"
    for d in (base_dir, changed_dir):
        d.mkdir()
        _prepare(d, monkeypatch)
    monkeypatch.chdir(base_dir)
    if tuple(context) not in _BASELINES:
        _BASELINES[tuple(context)] = fingerprint(base_dir, context)
    before, base_error = _BASELINES[tuple(context)]
    assert base_error is None, f"{key}: the run without the change failed: {base_error}"
    monkeypatch.chdir(changed_dir)
    after, error = fingerprint(changed_dir, context + change)
    if key not in REFUSAL_IS_THE_CHANGE:
        assert error is None, f"{key}: {change} made the run fail: {error}"
    else:
        assert error is not None, f"{key}: {change} should have been refused"
    assert before != after, f"{key}: {change} changed nothing in the run"
