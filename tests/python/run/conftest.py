"""Fixtures of the run tests: a tiny configuration over a small local text corpus, and one
trained run shared by the tests of a module."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_CONFIG = """\
model:
  vocab_size: 259
  d_model: 32
  n_heads: 4
  n_kv_heads: 2
  d_ff: 64
  n_layers: 2
  attention_type: gqa
  attention_mode: {mode}
  use_rope: true
  max_seq_len: 64
  architecture: {{n_stacks: 2, blocks_per_stack: 1}}
training:
  learning_rate: 3e-3
  batch_size: 4
  seq_len: 32
  log_every: 2
  eval_every: 2
  time_step_masking: {masking}
  optimizer: {{warmup_steps: 0}}
  progressive: {{target_stacks: 2, steps_per_stack: 4, building_mode: {building},
                 training_objective: {objective}}}
data: {{corpus: {corpus}, tokenizer: bytes, val_fraction: 0.1}}
"""


def write_tiny(folder: Path, objective: str = "clm", building: str = "append") -> Path:
    """Write a small corpus and a tiny config into ``folder``; returns the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    lines = [
        f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n" for i in range(160)
    ]
    corpus.write_text("".join(lines))
    masked = objective != "clm"
    cfg = folder / f"tiny-{objective}.yaml"
    cfg.write_text(
        TINY_CONFIG.format(
            mode="bidirectional" if masked else "causal",
            masking="true" if masked else "false",
            building=building,
            objective=objective,
            corpus=corpus,
        )
    )
    return cfg


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("STACKWISE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "token-cache"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """``(config_path, run_dir)`` of a finished 2-stack causal run (trained in-process)."""
    from stackwise.cli import main

    folder = tmp_path_factory.mktemp("trained")
    mp = pytest.MonkeyPatch()
    mp.setenv("STACKWISE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "token-cache"))
    try:
        cfg = write_tiny(folder)
        run_dir = folder / "run"
        assert main(["train", "--config", str(cfg), "--run-dir", str(run_dir)]) == 0
    finally:
        mp.undo()
    return cfg, run_dir


@pytest.fixture
def make_tiny():
    """The :func:`write_tiny` function."""
    return write_tiny
