"""`make gpu-check`'s driver (bench/gpu_check.py), what can be checked without a GPU: every shipped
config with the check's overrides is a valid configuration the planner plans, the memory
benchmark's racks are valid, and the summary reports failures and the memory table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from stackwise.config.base import StackWiseConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402
import gpu_memory  # noqa: E402

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_train_overrides_make_valid_configs(path):
    overrides = [
        f"training.max_steps={gpu_check.STEPS}",
        "training.device=cpu",  # validation refuses cuda without a GPU; the rest is the check's
        "training.checkpointing.enabled=false",
        *gpu_check.TRAIN_OVERRIDES.get(path.stem, []),
        *gpu_check.init_from_override(path.stem)[0],  # ([], reason) when the model is missing
    ]
    config = StackWiseConfig.from_yaml(path, overrides=overrides).validate()
    assert config.training.max_steps == gpu_check.STEPS


def test_memory_racks_are_valid():
    for depth in (2, 16):
        config = gpu_memory.make_config(depth)
        assert config.model.n_layers == depth == config.training.progressive.target_stacks


def test_summary_names_failures_and_memory_rows():
    report = {
        "device": "H200",
        "seconds": 480.0,
        "parts": {
            "build": {"status": "ok", "seconds": 200.0, "tail": ""},
            "pytest_cuda": {
                "status": "failed (exit 1)",
                "seconds": 90.0,
                "tail": "...\nFAILED tests/python/ops/test_attention.py::test_x - boom\n",
                "counts": {"tests": 40, "failures": 1, "errors": 0, "skipped": 2},
            },
        },
        "memory_rows": [
            {
                "blocks": 2,
                "progressive_peak_gib": 3.25,
                "progressive_planned_gib": 2.98,
                "end_to_end_planned_gib": 4.98,
                "end_to_end_error": "out of memory",
            }
        ],
    }
    text = "\n".join(gpu_check.summary_lines(report))
    assert "40 tests, 1 failed, 2 skipped" in text
    assert "! pytest_cuda: FAILED tests/python/ops/test_attention.py::test_x - boom" in text
    assert "3.25 /     2.98" in text and "error /     4.98" in text


def test_a_missing_pretrained_model_is_a_skip_with_its_reason(monkeypatch):
    monkeypatch.setitem(gpu_check.INIT_FROM_PACKAGES, "grow-x", "no_such_package_here")
    overrides, why = gpu_check.init_from_override("grow-x")
    assert overrides == [] and "no_such_package_here" in why
    assert gpu_check.init_from_override("shakespeare-tiny") == ([], None)
