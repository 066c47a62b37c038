"""Small runs just work: a run with fewer steps than the configured warmup runs, each stage
that the warmup does not fit warms up for a tenth of its steps instead, and `stackwise train`
says so in one line (before, the configuration was refused: "warmup_steps: 30 exceeds
training.max_steps=4")."""

from __future__ import annotations

import math

import pytest

from stackwise.cli import main
from stackwise.run.metrics import read_metrics
from stackwise.training.growth import stage_steps_share
from stackwise.training.optim import effective_warmup, lr_lambda

LR = 3e-3  # the tiny config's training.learning_rate


def _train(make_tiny, tmp_path, capsys, *overrides: str) -> tuple[str, list[dict]]:
    cfg = make_tiny(tmp_path)
    run = tmp_path / "run"
    args = ["train", "--config", str(cfg), "--run-dir", str(run), "--no-progress-bar"]
    args += [
        "training.optimizer.warmup_steps=30",
        "training.progressive.steps_per_stack=null",
        "training.log_every=1",
        *overrides,
    ]
    assert main(args) == 0
    return capsys.readouterr().out, read_metrics(run / "metrics.jsonl")


def _stage_lrs(records: list[dict]) -> dict[int, list[float]]:
    lrs: dict[int, list[float]] = {}
    for r in records:
        if r["type"] == "step":
            lrs.setdefault(r["stage"], []).append(r["lr"])
    return lrs


def test_smoke_run_shorter_than_the_warmup_runs_and_says_so(make_tiny, tmp_path, capsys):
    out, records = _train(make_tiny, tmp_path, capsys, "training.max_steps=4")
    lines = [line for line in out.splitlines() if line.startswith("warmup:")]
    assert len(lines) == 1, out
    assert "warmup_steps=30" in lines[0] and "stage's 2 steps" in lines[0]
    assert "shortened to 0" in lines[0] and "never reach its peak" in lines[0]
    lrs = _stage_lrs(records)
    assert sorted(lrs) == [0, 1] and [len(v) for v in lrs.values()] == [2, 2]
    # No warmup left: each stage starts at the peak learning rate.
    assert lrs[0][0] == pytest.approx(LR) and lrs[1][0] == pytest.approx(LR)
    assert records[-1]["type"] == "final"


def test_per_stage_budgets_shorten_only_the_stages_the_warmup_does_not_fit(
    make_tiny, tmp_path, capsys
):
    # front_loaded over 2 stages: 28 steps -> 18 + 10; a warmup of 12 fits stage 1 only.
    assert [stage_steps_share(28, 2, s, "front_loaded") for s in (0, 1)] == [18, 10]
    out, records = _train(
        make_tiny,
        tmp_path,
        capsys,
        "training.max_steps=28",
        "training.optimizer.warmup_steps=12",
        "training.progressive.stage_budget=front_loaded",
    )
    lines = [line for line in out.splitlines() if line.startswith("warmup:")]
    assert len(lines) == 1 and "warmup_steps=12" in lines[0] and "stage's 10 steps" in lines[0]
    assert "shortened to 1" in lines[0]
    lrs = _stage_lrs(records)
    assert lrs[0][:3] == pytest.approx([LR / 12, 2 * LR / 12, 3 * LR / 12])  # kept: 12 steps
    assert lrs[0][11] == pytest.approx(LR)
    assert lrs[1][:2] == pytest.approx([LR, LR])  # shortened to 1 step: (0 + 1) / 1, then peak


def test_effective_warmup():
    assert effective_warmup(30, 300) == 30
    assert effective_warmup(30, 31) == 30
    assert effective_warmup(30, 30) == 3
    assert effective_warmup(30, 4) == 0
    assert effective_warmup(0, 4) == 0
    assert effective_warmup(5, 0) == 0


def test_lr_schedule_of_a_stage_shorter_than_the_warmup_reaches_the_peak():
    from stackwise.config.base import OptimizerConfig

    cfg = OptimizerConfig(warmup_steps=30, schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(cfg, 4)
    assert f(0) == pytest.approx(1.0)
    assert f(3) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(0.75 * math.pi)))


def test_a_warmup_longer_than_the_run_is_valid():
    from stackwise.config.base import StackWiseConfig

    config = StackWiseConfig.from_dict(
        {"training": {"max_steps": 4, "optimizer": {"warmup_steps": 30}}}
    ).validate()
    assert config.training.optimizer.warmup_steps == 30
