"""Data-parallel progressive training (CPU, gloo): 2-process DDP and FSDP runs match a 1-process
run with the global batch (losses and final weights); a 2-process run resumed from a mid-stage
checkpoint continues identically; a rank that raises fails the job quickly with ``rank N:``;
per-rank spill directories; data sharding; the ``training.distributed`` config."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stackwise.config.base import StackWiseConfig
from stackwise.data.sharding import RankShardSampler, ShardedBatches
from stackwise.exceptions import ConfigurationError, TrainingError
from stackwise.training import ProgressiveTrainer
from stackwise.training.distributed import DistributedContext

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
WORKER = HERE / "_dist_worker.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
TIMEOUT = 120

_spec = importlib.util.spec_from_file_location("_dist_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

needs_torchrun = pytest.mark.skipif(
    not TORCHRUN.exists() or not torch.distributed.is_available(),
    reason="torchrun / torch.distributed not available",
)


def _launch(out: Path, *args: str, nproc: int = 2, check: bool = True):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        str(TORCHRUN),
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        "--out",
        str(out),
        *args,
    ]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    proc.elapsed = time.monotonic() - t0
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _load(out: Path):
    from safetensors.torch import load_file

    reports = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return reports, load_file(str(out / "final.safetensors"))


def _assert_same_run(out: Path, ref: Path, rtol=1e-5, atol=1e-6, w_atol=5e-5):
    # Weights: gradients summed in another order differ by ~1e-7, which Adam turns into up to
    # ~1.5e-5 on weights of ~0.2 after 12 steps (measured, DDP and FSDP alike).
    reports, weights = _load(out)
    ref_reports, ref_weights = _load(ref)
    ref_report = ref_reports[0]
    assert len(reports) == 2
    for rep in reports:  # every rank logs the global loss
        for got, want in zip(rep["losses"], ref_report["losses"], strict=True):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=rtol, atol=atol)
        assert rep["tokens"] == ref_report["tokens"]  # tokens are counted over all ranks
    assert weights.keys() == ref_weights.keys()
    for k in weights:
        torch.testing.assert_close(weights[k], ref_weights[k], rtol=1e-4, atol=w_atol, msg=k)
    return reports


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process run with the global batch (in this process)."""
    out = tmp_path_factory.mktemp("one")
    assert worker.main(["--out", str(out), "--eval"]) == 0
    return out


# ---- multi-process runs -------------------------------------------------------------------------


@needs_torchrun
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, reference, strategy):
    _launch(tmp_path, "--strategy", strategy, "--eval")
    reports = _assert_same_run(tmp_path, reference)
    (ref_report,), _ = _load(reference)
    for rep in reports:  # every rank evaluates the full rack on the same (unsharded) batches
        got, want = torch.tensor(rep["eval_loss"]), torch.tensor(ref_report["eval_loss"])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Callbacks (logging) run on rank 0 only, once per global step.
    assert [p.name for p in tmp_path.glob("steps-rank*.txt")] == ["steps-rank0.txt"]
    assert len((tmp_path / "steps-rank0.txt").read_text().splitlines()) == 2 * worker.STEPS
    assert reports[0]["losses"][-1][-1] < reports[0]["losses"][0][0]  # it learns


@needs_torchrun
def test_progressive_trainer_joins_a_torchrun_job_by_itself(tmp_path, reference):
    _launch(tmp_path, "--plain")
    reports = _assert_same_run(tmp_path, reference)
    assert [r["world_size"] for r in reports] == [2, 2]


@pytest.fixture(scope="module")
def qlora_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-qlora")
    assert worker.main(["--out", str(out), "--qlora", "--accum", "2"]) == 0
    return out


@needs_torchrun
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nf4_qlora_trunk_with_accumulation_matches_one_process(tmp_path, qlora_reference, strategy):
    """The quantized trunk is replicated; its adapters' gradients are reduced with the rest;
    2 micro-batches per step (the first without a gradient collective)."""
    _launch(tmp_path, "--strategy", strategy, "--qlora", "--accum", "2")
    _assert_same_run(tmp_path, qlora_reference)
    _, weights = _load(tmp_path)
    assert any(k.startswith("stacks.0.") and "lora_B" in k for k in weights)


@needs_torchrun
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_two_process_run_from_mid_stage_checkpoint(tmp_path, strategy):
    full, ckpt = tmp_path / "full", tmp_path / "ckpt"
    _launch(full, "--ckpt", str(ckpt), "--every-steps", "4", "--strategy", strategy)
    names = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("stage-"))
    assert names == [
        "stage-000",
        "stage-000-step-000004",
        "stage-001",
        "stage-001-step-000002",
    ]
    if strategy == "fsdp":  # sharded optimizer state of the kept mid-stage checkpoints
        assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == names[1::2]
    # Go back to the mid-stage checkpoint of stage 1 and continue from there on 2 processes.
    shutil.rmtree(ckpt / "stage-001")
    (ckpt / "latest").write_text("stage-001-step-000002\n")
    resumed = tmp_path / "resumed"
    _launch(resumed, "--ckpt", str(ckpt), "--every-steps", "4", "--resume", "--strategy", strategy)
    _assert_same_run(resumed, full, rtol=0, atol=0, w_atol=0)
    # The consolidated checkpoint loads in one process.
    config = worker.make_config()
    trainer, builder = ProgressiveTrainer.resume(str(ckpt), config)
    _, weights = _load(full)
    for k, v in builder.rack.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    assert len(trainer.history) == 2


@needs_torchrun
def test_failing_rank_fails_the_job_with_its_error(tmp_path):
    proc = _launch(tmp_path, "--fail-rank", "1", check=False)
    assert proc.returncode != 0
    assert "rank 1: RuntimeError: injected failure on this rank" in proc.stderr
    assert proc.elapsed < 60  # torchrun stops rank 0, which waits in a collective


@needs_torchrun
def test_sampler_loader_and_per_rank_spill_directories(tmp_path):
    ref = tmp_path / "one"
    assert worker.main(["--out", str(ref), "--loader"]) == 0  # RankShardSampler, world size 1
    out = tmp_path / "two"
    _launch(out, "--loader", "--spill")
    reports = _assert_same_run(out, ref)
    for rep in reports:
        assert rep["cache"]["spills"] > 0
        assert rep["cache_spill_dir"] == str(out / "spill" / f"rank{rep['rank']}")
    assert reports[0]["spill_dirs"] == [".", "rank0", "rank1"]


# ---- in-process pieces --------------------------------------------------------------------------


def test_sharded_batches_are_strided_slices_with_global_ids():
    data = worker.make_data(3)
    shards = [list(ShardedBatches(data, r, 2)) for r in range(2)]
    assert len(ShardedBatches(data, 0, 2)) == 3
    for i, batch in enumerate(data):
        for r in range(2):
            torch.testing.assert_close(shards[r][i]["input_ids"], batch[r::2])
            want = torch.arange(8)[r::2] + 8 * i
            torch.testing.assert_close(shards[r][i]["sample_id"], want)
    with pytest.raises(TrainingError, match="does not split over 3 ranks"):
        list(ShardedBatches(data, 0, 3))
    with pytest.raises(TrainingError, match="re-iterable"):
        ShardedBatches(iter(data), 0, 2)


def test_rank_shard_sampler_splits_the_one_process_order():
    one = RankShardSampler(20, 0, 1, global_batch=8, seed=5)
    ranks = [RankShardSampler(20, r, 2, global_batch=8, seed=5) for r in range(2)]
    for _ in range(2):  # two passes, different permutations, same on every world size
        order = list(one)
        parts = [list(s) for s in ranks]
        assert len(order) == 16
        assert all(len(p) == 8 == len(s) for p, s in zip(parts, ranks, strict=True))
        for i in range(2):  # global batch i of 8 -> rank r's batch i of 4
            glob = order[8 * i : 8 * (i + 1)]
            for r in range(2):
                assert parts[r][4 * i : 4 * (i + 1)] == glob[r::2]
    again = RankShardSampler(20, 0, 1, global_batch=8, seed=5)
    assert list(again) != list(again)  # a new permutation each pass
    again.set_epoch(1)
    first = list(again)
    again.set_epoch(1)
    assert list(again) == first  # deterministic by seed and epoch
    assert len(list(RankShardSampler(3, 1, 2, global_batch=8, seed=0))) == 4  # padded
    with pytest.raises(ConfigurationError, match="training.batch_size"):
        RankShardSampler(20, 0, 3, global_batch=8)


def test_create_data_loaders_reads_each_ranks_share(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from stackwise.data import create_data_loaders

    monkeypatch.setenv("STACKWISE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = StackWiseConfig.from_dict(
        {
            "training": {"batch_size": 4, "seq_len": 32, "seed": 3},
            "data": {"corpus": "pydoc", "tokenizer": "bytes"},
        }
    )
    one, _ = create_data_loaders(cfg, distributed=SimpleNamespace(rank=0, world_size=1))
    ranks = [
        create_data_loaders(cfg, distributed=SimpleNamespace(rank=r, world_size=2))[0]
        for r in range(2)
    ]
    assert len(one) == len(ranks[0]) == len(ranks[1]) > 0
    for _ in range(2):  # two passes
        parts = [list(loader) for loader in ranks]
        for i, glob in enumerate(one):
            for r in range(2):
                got = parts[r][i]
                assert got["input_ids"].shape == (2, 32)
                assert torch.equal(got["sample_id"], glob["sample_id"][r::2])
                assert torch.equal(got["input_ids"], glob["input_ids"][r::2])


def test_single_process_is_unchanged_and_none_refuses_many():
    config = worker.make_config()
    ctx = DistributedContext.from_env(config, env={})
    assert not ctx.enabled and ctx.is_main and ctx.world_size == 1
    assert ctx.all_reduce_mean(2.5) == 2.5 and ctx.spill_dir("s") == "s"
    data = worker.make_data(2)
    assert ctx.shard(data) is data
    assert ProgressiveTrainer(config).dist is None
    config.training.distributed.strategy = "none"
    with pytest.raises(ConfigurationError, match="training.distributed.strategy"):
        DistributedContext.from_env(config, env={"WORLD_SIZE": "2", "RANK": "0"})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("strategy", "zero3", "'zero3' is not one of"),
        ("backend", "mpi", "'mpi' is not one of"),
        ("timeout_s", 0, "must be > 0"),
        ("backend", "nccl", "'nccl' moves tensors between GPUs only"),
    ],
)
def test_distributed_config_validation(key, value, message):
    raw = {"training": {"device": "cpu", "distributed": {key: value}}}
    with pytest.raises(ConfigurationError, match=message) as info:
        StackWiseConfig.from_dict(raw).validate()
    assert info.value.key == f"training.distributed.{key}"
    ok = StackWiseConfig.from_dict({"training": {"distributed": {"strategy": "fsdp"}}}).validate()
    assert ok.training.distributed.strategy == "fsdp" and ok.training.distributed.timeout_s > 0
