"""The single step and loop every trainer runs: defects of the two former copies, each pinned
by a test that failed before the trainers shared one loop, and the training keys that used to be
validated and ignored (storage precision, dtype, time_step_masking)."""

from __future__ import annotations

import pytest
import torch

from stackwise.config.base import StackWiseConfig
from stackwise.exceptions import ConfigurationError, TrainingError
from stackwise.training import FusionTrainer, ProgressiveRackBuilder, ProgressiveTrainer, Trainer
from stackwise.training.step import compute_dtype
from utils import tiny_model

VOCAB = 24


def _config(model=None, **training):
    progressive = training.pop("progressive", {})
    objective = progressive.get("training_objective", "clm")
    return StackWiseConfig.from_dict(
        {
            "model": tiny_model(
                VOCAB,
                use_rope=True,
                attention_mode="causal" if objective == "clm" else "bidirectional",
                **(model or {}),
            ),
            "training": {
                "learning_rate": 3e-3,
                "batch_size": 8,
                "seq_len": 16,
                "max_steps": 0,
                "qlora_enabled": False,
                "block_size": 1,
                "time_step_masking": objective != "clm",
                "optimizer": {"warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 0.0},
                "progressive": {"target_stacks": 2, "steps_per_stack": 4, **progressive},
                "caching": {"storage_precision": "as_is"},
                **training,
            },
        }
    ).validate()


def _data(n_batches=4, b=8, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        start = torch.randint(0, VOCAB - 1, (b, 1), generator=g)
        ids = (start + torch.arange(s)) % (VOCAB - 1)
        out.append({"input_ids": ids, "sample_id": torch.arange(b) + i * b})
    return out


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the fusion trainer backs blocks up under checkpoints/


class _Steps:
    def __init__(self):
        self.steps = []

    def on_step(self, info):
        self.steps.append(info)


@pytest.mark.parametrize("objective", ["mlm", "diffusion"])
def test_fusion_trainer_masks_for_masked_objectives(objective):
    # Before: FusionTrainer trained at mask ratio 0: nothing masked, a constant zero loss.
    config = _config(progressive={"training_objective": objective})
    torch.manual_seed(0)
    fusion = FusionTrainer(config, steps_per_block=3)
    res = fusion.train(_data())
    for record in res["history"]:
        assert record["mask_ratio"] > 0
        assert all(loss > 0.1 for loss in record["losses"])


def test_a_step_without_targets_is_an_error():
    config = _config()
    data = [{"input_ids": b["input_ids"], "labels": torch.full((8, 16), -100)} for b in _data()]
    with pytest.raises(TrainingError, match="no micro-batch of the step has a target"):
        Trainer(config).train_rack(None, data, max_steps=2)


def _up_and_gate(rack, block=0):
    ffn = [b for s in rack.stacks for b in s.blocks][block].ffn
    return ffn.up_proj.weight.detach().clone(), ffn.gate_proj.weight.detach().clone()


@pytest.mark.parametrize("trainer_kind", ["progressive", "hierarchical", "fusion"])
def test_freeze_up_proj_keeps_the_up_projection_fixed(trainer_kind):
    # Before: every trainer set requires_grad on the whole unit, so the fixed random SwiGLU
    # up projection trained.
    config = _config(model={"freeze_up_proj": True})
    torch.manual_seed(0)
    if trainer_kind == "progressive":
        builder = ProgressiveRackBuilder(config)
        seen = []

        class _AtStart:
            def on_stage_start(self, info):
                seen.extend(_up_and_gate(builder.rack))

        ProgressiveTrainer(config, callbacks=[_AtStart()]).train_rack(builder, _data(), 1)
        up0, gate0 = seen
        rack = builder.rack
    elif trainer_kind == "hierarchical":
        trainer = Trainer(config)
        up0, gate0 = _up_and_gate(trainer.rack)
        trainer.train_block(0, _data(), max_steps=3)
        rack = trainer.rack
    else:
        fusion = FusionTrainer(config, steps_per_block=3)
        last = len(fusion.blocks) - 1  # earlier blocks are converted when they retire
        up0, gate0 = _up_and_gate(fusion.model, last)
        fusion.train(_data())
        up1, gate1 = _up_and_gate(fusion.model, last)
        assert torch.equal(up0, up1) and not torch.equal(gate0, gate1)
        return
    up1, gate1 = _up_and_gate(rack)
    assert torch.equal(up0, up1)
    assert not torch.equal(gate0, gate1)


def test_logged_lr_is_the_rate_the_step_used():
    # Before: the lr was read after the scheduler step, i.e. the next step's.
    config = _config(learning_rate=1e-2, optimizer={"warmup_steps": 4, "weight_decay": 0.0})
    rec = _Steps()
    Trainer(config, callbacks=[rec]).train_rack(None, _data(), max_steps=5)
    assert [s["lr"] for s in rec.steps] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2])


def test_cached_and_recomputed_prefix_agree_with_dropout():
    # Before: the hierarchical trainer filled its cache in train mode (the prefix's dropout mask
    # baked into the cache), while a recomputed prefix drew new dropout every step.
    config = _config(model={"dropout": 0.3})

    def losses(cache: bool):
        torch.manual_seed(0)
        trainer = Trainer(config, cache_activations=cache)
        trainer.train_block(0, _data(), max_steps=2)
        return trainer.train_block(1, _data(), max_steps=4)

    cached, recomputed = losses(True), losses(False)
    assert cached["cached_prefix"] and not recomputed["cached_prefix"]
    torch.testing.assert_close(
        torch.tensor(cached["losses"]), torch.tensor(recomputed["losses"]), rtol=1e-5, atol=1e-6
    )


def test_storage_precision_compresses_the_cache():
    # Before: training.caching.storage_precision was validated and ignored (always as-is).
    def cache_stats(precision):
        config = _config(caching={"storage_precision": precision})
        torch.manual_seed(0)
        trainer = ProgressiveTrainer(config)
        res = trainer.train_rack(ProgressiveRackBuilder(config), _data(), target_stacks=2)
        return res["history"][1]["cache"]

    full, half = cache_stats("as_is"), cache_stats("fp16")
    assert half["bytes_in_memory"] < 0.6 * full["bytes_in_memory"]


def test_dtype_selects_the_compute_precision():
    # Before: training.dtype was validated and ignored.
    assert compute_dtype(_config().training) is None
    assert compute_dtype(_config(dtype="bf16").training) is torch.bfloat16
    assert compute_dtype(_config(autocast=True).training) is torch.bfloat16
    assert compute_dtype(_config(dtype="fp16").training) is torch.float16
    with pytest.raises(ConfigurationError, match="training.autocast"):
        compute_dtype(_config(dtype="fp16", autocast=True).training)

    def run(dtype):
        torch.manual_seed(0)
        return Trainer(_config(dtype=dtype)).train_rack(None, _data(), max_steps=3)["losses"]

    fp32, bf16, fp16 = run("fp32"), run("bf16"), run("fp16")
    assert fp32 != bf16 and fp32 != fp16
    assert fp16 == pytest.approx(fp32, rel=2e-2) and bf16 == pytest.approx(fp32, rel=5e-2)


def test_time_step_masking_off_masks_every_stage_alike():
    # Before: the progressive trainer ignored training.time_step_masking.
    def ratios(time_step_masking):
        config = _config(
            progressive={"training_objective": "diffusion", "target_stacks": 3},
            time_step_masking=time_step_masking,
            model={"n_layers": 6, "architecture": {"n_stacks": 3, "blocks_per_stack": 2}},
        )
        trainer = ProgressiveTrainer(config)
        return [trainer.stage_ratio(s, 3) for s in range(3)]

    assert ratios(True) == pytest.approx([0.1, 0.5, 0.9])
    assert ratios(False) == pytest.approx([0.9, 0.9, 0.9])


@pytest.mark.parametrize(
    ("key", "use"),
    [
        ("training.caching.cache_mode=stack", "rack"),
        ("training.progressive.new_stack_precision=bf16", "training.dtype"),
        ("data.packing=false", "always pack"),
    ],
)
def test_keys_that_did_nothing_are_refused_saying_why(key, use):
    # Before: validated and ignored.
    with pytest.raises(ConfigurationError, match=f"{key.split('=')[0]}: removed: .*{use}"):
        StackWiseConfig.from_dict({}, overrides=[key])
