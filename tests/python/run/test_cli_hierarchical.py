"""``stackwise train`` trains the end-to-end baseline and the hierarchical modes
(``training.progressive.enabled: false`` with ``training.mode``), so a user can compare them
with progressive training on their own data. Before, ``training.mode`` was validated and ignored
under ``stackwise train`` and the run was always progressive."""

from __future__ import annotations

import json

import pytest

from stackwise.cli import main


@pytest.mark.parametrize(
    ("mode", "units"), [("rackwise", 1), ("stackwise", 2), ("layerwise", 2), ("fused", 2)]
)
def test_train_runs_the_configured_mode(tmp_path, make_tiny, capsys, mode, units):
    cfg = make_tiny(tmp_path)
    run_dir = tmp_path / "run"
    args = ["training.progressive.enabled=false", f"training.mode={mode}", "training.max_steps=4"]
    args.append("training.block_size=1")
    assert main(["train", "--config", str(cfg), "--run-dir", str(run_dir), *args]) == 0
    out = capsys.readouterr().out
    assert f"training.mode {mode!r}" in out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "stage_end" for r in records) == units
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_loss"] > 0
    assert (run_dir / "rack" / "model.safetensors").is_file()


def test_a_hierarchical_run_cannot_resume(tmp_path, make_tiny, capsys):
    cfg = make_tiny(tmp_path)
    run_dir = tmp_path / "run"
    args = ["training.progressive.enabled=false", "training.mode=rackwise", "training.max_steps=2"]
    assert main(["train", "--config", str(cfg), "--run-dir", str(run_dir), *args]) == 0
    capsys.readouterr()
    assert main(["train", "--run-dir", str(run_dir), "--resume"]) == 2
    assert "continues progressive runs only" in capsys.readouterr().err
