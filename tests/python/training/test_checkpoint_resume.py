"""Mid-stage checkpoints and exact resume: a run interrupted after any step (in stage 0, reading
a shuffling DataLoader across passes; in stage 1, refilling the activation cache) and resumed in
a fresh trainer gives bit-for-bit the losses and weights of a run never interrupted; checkpoint
files, the latest pointer, keep_last pruning and corruption checks."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from stackwise.config.base import StackWiseConfig
from stackwise.exceptions import TrainingError
from stackwise.training import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise.training.checkpoint import checkpoint_folders, latest_checkpoint
from utils import tiny_model

VOCAB = 24
STEPS = 6


class _Counting(Dataset):
    """Counting sequences (token t+1 = token t + 1 mod VOCAB - 1), one per sample id."""

    def __init__(self, n: int = 18, s: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.starts = torch.randint(0, VOCAB - 1, (n,), generator=g)
        self.s = s

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        ids = (self.starts[i] + torch.arange(self.s)) % (VOCAB - 1)
        return {"input_ids": ids, "sample_id": i}


def _loader(shuffle: bool = True) -> DataLoader:
    # 18 samples / 4 = 5 batches (the last of 2): a stage of 6 steps x 2 micro-batches reads
    # 12 batches, in three shuffled passes. Without shuffling there is no generator, and each
    # pass draws its worker seed from the global RNG.
    if not shuffle:
        return DataLoader(_Counting(), batch_size=4, shuffle=False)
    return DataLoader(
        _Counting(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(7)
    )


def _config(strategy: str = "frozen", objective: str = "diffusion", **ckpt):
    return StackWiseConfig.from_dict(
        {
            "model": tiny_model(
                VOCAB,
                max_seq_len=16,
                use_rope=True,
                dropout=0.1,  # draws from the global RNG at every step
                attention_mode="bidirectional" if objective != "clm" else "causal",
            ),
            "training": {
                "learning_rate": 3e-3,
                "max_steps": 0,
                "seq_len": 12,
                "seed": 11,
                "qlora_enabled": False,
                "time_step_masking": objective != "clm",
                "optimizer": {"warmup_steps": 2, "grad_accumulation": 2},
                "progressive": {
                    "target_stacks": 2,
                    "steps_per_stack": STEPS,
                    "trunk_strategy": strategy,
                    "training_objective": objective,
                },
                "qlora": {"rank": 4, "alpha": 8.0, "dropout": 0.1, "new_stack_lora": True},
                "checkpointing": {"every_steps": 1, "keep_last": 50, **ckpt},
            },
        }
    ).validate()


class _Interrupt(Exception):
    pass


class _StopAt:
    def __init__(self, global_step: int) -> None:
        self.global_step = global_step

    def on_step(self, info):
        if info["global_step"] == self.global_step:
            raise _Interrupt


def _uninterrupted(config, shuffle: bool = True):
    builder = ProgressiveRackBuilder(config)
    res = ProgressiveTrainer(config).train_rack(builder, _loader(shuffle))
    return res, builder.rack.state_dict()


def _assert_same_run(res, state, ref_res, ref_state):
    assert [h["losses"] for h in res["history"]] == [h["losses"] for h in ref_res["history"]]
    assert state.keys() == ref_state.keys()
    for k in ref_state:
        assert torch.equal(state[k], ref_state[k]), k


@pytest.mark.parametrize(
    ("stop", "strategy", "shuffle"),
    [
        (3, "frozen", True),
        (5, "frozen", True),
        (STEPS + 2, "frozen", True),
        (STEPS + 2, "frozen", False),
        (STEPS + 3, "qlora", True),
    ],
)
def test_interrupted_run_resumes_exactly(tmp_path, stop, strategy, shuffle):
    """stop 3: stage 0 inside the second loader pass; 5: at the end of a pass; STEPS+2, +3:
    stage 1, whose resumed run refills the cache and skips the batches already read."""
    config = _config(strategy)
    ref_res, ref_state = _uninterrupted(config, shuffle)
    assert ref_res["history"][1]["cache"] is not None  # stage 1 reads the cache

    trainer = ProgressiveTrainer(config, checkpoint_dir=str(tmp_path), callbacks=[_StopAt(stop)])
    with pytest.raises(_Interrupt):
        trainer.train_rack(ProgressiveRackBuilder(config), _loader(shuffle))
    stage, step = divmod(stop, STEPS)
    assert latest_checkpoint(tmp_path).name == f"stage-{stage:03d}-step-{step:06d}"

    torch.manual_seed(1234)  # a new process: another global RNG state, a new loader
    builder = ProgressiveRackBuilder(config)
    resumed = ProgressiveTrainer(config, checkpoint_dir=str(tmp_path))
    res = resumed.train_rack(builder, _loader(shuffle), resume=True)
    _assert_same_run(res, builder.rack.state_dict(), ref_res, ref_state)
    assert resumed.global_step == 2 * STEPS


def test_classmethod_resume_from_mid_stage(tmp_path):
    config = _config()
    ref_res, ref_state = _uninterrupted(config)
    trainer = ProgressiveTrainer(config, checkpoint_dir=str(tmp_path), callbacks=[_StopAt(8)])
    with pytest.raises(_Interrupt):
        trainer.train_rack(ProgressiveRackBuilder(config), _loader())
    torch.manual_seed(99)
    seen = []

    class _Rec:
        def on_stage_start(self, info):
            seen.append((info["stage"], info["start_step"]))

    resumed, builder = ProgressiveTrainer.resume(str(tmp_path), config, callbacks=[_Rec()])
    assert builder.n_stacks == 2 and len(resumed.history) == 1
    res = resumed.train_rack(builder, _loader())
    assert seen == [(1, 2)]
    _assert_same_run(res, builder.rack.state_dict(), ref_res, ref_state)


def test_resume_true_without_checkpoint_starts_fresh(tmp_path):
    config = _config(every_steps=0)
    ref_res, ref_state = _uninterrupted(config)
    builder = ProgressiveRackBuilder(config)
    res = ProgressiveTrainer(config, checkpoint_dir=str(tmp_path)).train_rack(
        builder, _loader(), resume=True
    )
    _assert_same_run(res, builder.rack.state_dict(), ref_res, ref_state)
    # Stage checkpoints only (every_steps 0); keep_last 50 keeps both.
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["stage-000", "stage-001"]


def test_checkpoint_files_pointer_and_pruning(tmp_path):
    config = _config(keep_last=3)
    ProgressiveTrainer(config, checkpoint_dir=str(tmp_path)).train_rack(
        ProgressiveRackBuilder(config), _loader()
    )
    names = [p.name for p in checkpoint_folders(tmp_path)]
    assert names == ["stage-001-step-000004", "stage-001-step-000005", "stage-001"]
    assert (tmp_path / "latest").read_text().strip() == "stage-001"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    mid = tmp_path / "stage-001-step-000005"
    manifest = json.loads((mid / "manifest.json").read_text())
    assert set(manifest) == {
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "builder.json",
        "trainer.json",
    }
    state = json.loads((mid / "trainer.json").read_text())
    progress = state["in_progress"]
    assert progress["step"] == 5 and len(progress["losses"]) == 5
    assert progress["scheduler"]["last_epoch"] == 5
    groups = [g["name"] for g in progress["optimizer"]["param_groups"]]
    assert groups == ["current_stack", "current_stack_lora", "head"]


def test_corrupt_optimizer_state_is_refused(tmp_path):
    config = _config()
    trainer = ProgressiveTrainer(config, checkpoint_dir=str(tmp_path), callbacks=[_StopAt(2)])
    with pytest.raises(_Interrupt):
        trainer.train_rack(ProgressiveRackBuilder(config), _loader())
    path = latest_checkpoint(tmp_path) / "optimizer.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x11
    path.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match="optimizer.safetensors is corrupt"):
        ProgressiveTrainer(config, checkpoint_dir=str(tmp_path)).train_rack(
            ProgressiveRackBuilder(config), _loader(), resume=True
        )
    with pytest.raises(TrainingError, match="needs the trainer's checkpoint_dir"):
        ProgressiveTrainer(config).train_rack(
            ProgressiveRackBuilder(config), _loader(), resume=True
        )
