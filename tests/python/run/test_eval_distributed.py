"""The final evaluation under torchrun: two processes (gloo, CPU) each score their share of the
validation batches, the sums are all-reduced, and both ranks return exactly the figures one
process computes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stackwise.run.evaluate import evaluate_run, load_run

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("_eval_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
BATCH = 4  # the tiny validation split then has an odd number of batches (7)

pytestmark = pytest.mark.skipif(
    not TORCHRUN.exists() or not torch.distributed.is_available(),
    reason="torchrun / torch.distributed not available",
)


def test_two_ranks_split_the_batches_and_match_one_process(trained_run, tmp_path):
    _, run_dir = trained_run
    one = evaluate_run(load_run(run_dir, device="cpu"), "val", batch_size=BATCH)
    n_batches = math.ceil(one["windows"] / BATCH)
    assert n_batches >= 3

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        str(run_dir),
        str(tmp_path),
        str(BATCH),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Each rank scored its own share (batches r, r + 2, ...), together every batch once.
    assert [r["batches"] for r in ranks] == [(n_batches + 1) // 2, n_batches // 2]
    for r in ranks:
        for key in ("scored_tokens", "bytes", "windows", "tokens", "split"):
            assert r[key] == one[key], key
        for key in ("loss", "perplexity", "bits_per_byte", "unigram_loss"):
            assert math.isclose(r[key], one[key], rel_tol=1e-12), (key, r[key], one[key])


def test_eval_max_tokens_scores_the_first_windows_and_says_so(trained_run):
    _, run_dir = trained_run
    run = load_run(run_dir, device="cpu")
    whole = evaluate_run(run, "val", batch_size=2)
    seq = whole["tokens"] // whole["windows"]
    run.config.training.eval_max_tokens = 2 * seq + 5  # two windows' worth
    capped = evaluate_run(run, "val", batch_size=2)
    assert capped["windows"] == 2 and capped["tokens"] == 2 * seq
    assert capped["split_tokens"] == whole["split_tokens"] == whole["tokens"]
    run.config.training.eval_max_tokens = None
    first_batch = evaluate_run(run, "val", batch_size=2, max_batches=1)
    assert capped["loss"] == first_batch["loss"] and capped["bytes"] == first_batch["bytes"]
    assert capped["loss"] != whole["loss"]
