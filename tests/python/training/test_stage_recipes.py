"""Per-stage recipes of the progressive trainer ([Q1]): ``stage_lr_scale`` raises the learning
rate of every stage after the first, and ``noise_ranges`` gives each stage of a masked objective
its own range of mask ratios (one ratio per sample) instead of one ratio."""

from __future__ import annotations

import math

import pytest
import torch

from stackwise.config.base import StackWiseConfig
from stackwise.exceptions import ConfigurationError
from stackwise.training import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise.training.growth import stage_noise_range
from utils import tiny_model

VOCAB = 24


def _config(objective="clm", mode="append", masking=None, **progressive):
    attention = "causal" if objective == "clm" else "bidirectional"
    return StackWiseConfig.from_dict(
        {
            "model": tiny_model(VOCAB, use_rope=True, tie_embeddings=False)
            | {"attention_mode": attention},
            "training": {
                "learning_rate": 1e-3,
                "batch_size": 4,
                "seq_len": 16,
                "max_steps": 0,
                "qlora_enabled": False,
                "time_step_masking": objective != "clm",
                "checkpointing": {"enabled": False},
                "masking": masking or {"min_fraction": 0.1, "max_fraction": 0.9},
                "progressive": {
                    "target_stacks": 2,
                    "steps_per_stack": 2,
                    "building_mode": mode,
                    "training_objective": objective,
                    **progressive,
                },
            },
        }
    ).validate()


def _data(n=2):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, VOCAB - 1, (4, 16), generator=g)} for _ in range(n)]


class _Record:
    def __init__(self):
        self.lrs: dict[int, list[float]] = {}
        self.ratios: dict[int, float] = {}

    def on_step(self, info):
        self.lrs.setdefault(info["stage"], []).append(info["lr"])

    def on_stage_start(self, info):
        self.ratios[info["stage"]] = info["mask_ratio"]


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_stage_lr_scale_multiplies_the_later_stages(scale):
    torch.manual_seed(0)
    cfg = _config(stage_lr_scale=scale, steps_per_stack=1)
    cfg.training.optimizer.schedule = "constant"
    rec = _Record()
    trainer = ProgressiveTrainer(cfg, callbacks=[rec])
    trainer.train_rack(ProgressiveRackBuilder(cfg, "append"), _data())
    assert rec.lrs[0] == [pytest.approx(1e-3)]
    assert rec.lrs[1] == [pytest.approx(1e-3 * scale)]


def test_stage_lr_scale_must_be_positive():
    with pytest.raises(ConfigurationError, match="stage_lr_scale"):
        _config(stage_lr_scale=0.0)


def test_linear_and_equal_mass_ranges():
    lin = [stage_noise_range(0.1, 0.9, "linear", k, 4) for k in range(4)]
    assert lin[0] == pytest.approx((0.1, 0.3)) and lin[3] == pytest.approx((0.7, 0.9))
    eq = [stage_noise_range(0.01, 1.0, "equal_mass", k, 4) for k in range(4)]
    assert eq[0][0] == pytest.approx(0.01) and eq[-1][1] == pytest.approx(1.0)
    masses = [math.log(b / a) for a, b in eq]  # the integral of 1/t over each range
    assert masses == pytest.approx([masses[0]] * 4)
    for ranges in (lin, eq):  # contiguous, increasing
        assert all(a[1] == pytest.approx(b[0]) for a, b in zip(ranges, ranges[1:], strict=False))
    with pytest.raises(ConfigurationError, match="min_fraction"):
        stage_noise_range(0.0, 1.0, "equal_mass", 0, 2)


def test_noise_ranges_refused_for_clm_and_zero_min():
    with pytest.raises(ConfigurationError, match="noise_ranges"):
        _config(noise_ranges="linear")
    with pytest.raises(ConfigurationError, match="noise_ranges"):
        _config(
            "diffusion",
            "prepend",
            {"min_fraction": 0.0, "max_fraction": 1.0},
            noise_ranges="equal_mass",
        )


def test_a_range_draws_a_ratio_per_sample_inside_it():
    cfg = _config("diffusion", "prepend", noise_ranges="linear")
    trainer = ProgressiveTrainer(cfg)
    ids = torch.randint(0, VOCAB - 1, (64, 16), generator=torch.Generator().manual_seed(1))
    parsed = trainer.step.parse({"input_ids": ids}, 0)
    inputs, labels, t = trainer.step.corrupt(parsed, (0.2, 0.6))
    assert t is None  # depth time: the rack is not told the level
    masked = (labels != -100).float().mean(1)
    assert masked.std() > 0.05  # ratios differ between samples
    assert 0.1 < float(masked.mean()) < 0.7
    _, _, t_in = ProgressiveTrainer(
        _config("diffusion", "prepend", noise_ranges="linear", time_interpretation="input")
    ).step.corrupt(parsed, (0.2, 0.6))
    assert t_in is not None and bool(((t_in >= 0.2) & (t_in <= 0.6)).all())


@pytest.mark.parametrize("mode", ["linear", "equal_mass"])
def test_the_trainer_gives_each_stage_its_range(mode):
    torch.manual_seed(0)
    cfg = _config("diffusion", "prepend", noise_ranges=mode)
    rec = _Record()
    trainer = ProgressiveTrainer(cfg, callbacks=[rec])
    assert trainer.stage_ratio(0, 2) == pytest.approx(stage_noise_range(0.1, 0.9, mode, 0, 2))
    trainer.train_rack(ProgressiveRackBuilder(cfg, "prepend"), _data())
    for k in (0, 1):
        lo, hi = stage_noise_range(0.1, 0.9, mode, k, 2)
        assert rec.ratios[k] == pytest.approx((lo + hi) / 2)
    assert rec.ratios[1] > rec.ratios[0]  # the newest (leftmost) stack denoises the most
