"""`torchrun --nproc_per_node=2 -m stackwise train`: two processes (gloo, CPU) train the tiny run
data-parallel, rank 0 alone writes the run directory, and the result matches one process with the
same global batch; bad input fails the whole job with a non-zero exit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stackwise.cli import main
from stackwise.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[3]
TORCHRUN = Path(sys.executable).with_name("torchrun")
TIMEOUT = 240

pytestmark = pytest.mark.skipif(
    not TORCHRUN.exists() or not torch.distributed.is_available(),
    reason="torchrun / torch.distributed not available",
)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "stackwise", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def test_two_process_train_matches_one_process(tmp_path, make_tiny):
    cfg = make_tiny(tmp_path)
    overrides = ["model.dropout=0.0", "training.distributed.strategy=ddp"]
    single = tmp_path / "single"
    assert main(["train", "--config", str(cfg), "--run-dir", str(single), *overrides]) == 0
    double = tmp_path / "double"
    proc = _torchrun("train", "--config", str(cfg), "--run-dir", str(double), *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ("summary.json", "metrics.jsonl", "rack/model.safetensors", "plots/loss.png"):
        assert (double / name).is_file(), name
    one = json.loads((single / "summary.json").read_text())
    two = json.loads((double / "summary.json").read_text())
    assert math.isclose(one["val_loss"], two["val_loss"], rel_tol=1e-4)
    steps = [
        [r["loss"] for r in read_metrics(d / "metrics.jsonl") if r["type"] == "step"]
        for d in (single, double)
    ]
    assert len(steps[0]) == len(steps[1]) > 0  # rank 0 alone logged, once per step
    for a, b in zip(*steps, strict=True):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5)


def test_two_process_train_with_bad_input_fails_the_job(tmp_path):
    proc = _torchrun("train", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode != 0
    assert "missing.yaml" in proc.stderr
