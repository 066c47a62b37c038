"""ProgressiveTrainer on a small learnable task: append and prepend reach a loss well below
chance; the cached trunk gives the same losses as recomputing it; only the new stack (and trunk
adapters) change; qlora adapters train while quantized weights stay; errors."""

from __future__ import annotations

import math

import pytest
import torch

from stackwise.config.base import StackWiseConfig
from stackwise.exceptions import TrainingError
from stackwise.model.quantized import QuantizedLinear
from stackwise.training import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise.training.core.fusion_trainer import QLoRAAdapter

VOCAB = 24


def _config(model=None, **training):
    progressive = training.pop("progressive", {})
    mode = progressive.get("training_objective", "clm")
    return StackWiseConfig.from_dict(
        {
            "model": {
                "vocab_size": VOCAB,
                "d_model": 32,
                "n_heads": 4,
                "n_kv_heads": 4,
                "d_ff": 64,
                "n_layers": 4,
                "max_seq_len": 32,
                "use_rope": True,
                "attention_mode": "causal" if mode == "clm" else "bidirectional",
                "architecture": {"n_stacks": 2, "blocks_per_stack": 2},
                **(model or {}),
            },
            "training": {
                "learning_rate": 3e-3,
                "batch_size": 8,
                "seq_len": 16,
                "max_steps": 0,
                "qlora_enabled": False,
                "time_step_masking": mode != "clm",
                "optimizer": {"warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 0.0},
                "progressive": {"target_stacks": 2, "steps_per_stack": 60, **progressive},
                **training,
            },
        }
    ).validate()


def _data(n_batches=6, b=8, s=16, seed=0):
    """Counting sequences: token t+1 = token t + 1 (mod VOCAB - 1); the last id is the mask."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        start = torch.randint(0, VOCAB - 1, (b, 1), generator=g)
        ids = (start + torch.arange(s)) % (VOCAB - 1)
        out.append({"input_ids": ids, "sample_id": torch.arange(b) + i * b})
    return out


def test_documented_snippet_append_learns():
    torch.manual_seed(0)
    config = _config()
    rack_builder = ProgressiveRackBuilder(config=config, building_mode="append")
    trainer = ProgressiveTrainer(config=config)
    results = trainer.train_rack(
        rack_builder, _data(), target_stacks=2, eval_loader=_data(2, seed=9)
    )
    hist = results["history"]
    assert len(hist) == 2 and results["rack"] is rack_builder.build_rack()
    assert hist[0]["param_groups"] == ["current_stack", "head", "embeddings"]
    assert hist[1]["param_groups"] == ["current_stack", "head"]
    assert hist[-1]["eval_loss"] < 0.5 * math.log(VOCAB - 1)  # chance: log(23) = 3.14
    assert hist[1]["cache"] is not None and hist[1]["cache"]["entries"] == 6


def test_cached_trunk_matches_recomputed_trunk():
    losses = []
    for cache in (True, False):
        torch.manual_seed(1)
        config = _config(progressive={"cache_activations": cache, "steps_per_stack": 12})
        builder = ProgressiveRackBuilder(config)
        res = ProgressiveTrainer(config).train_rack(builder, _data(), target_stacks=2)
        losses.append(res["history"][1]["losses"])
    torch.testing.assert_close(
        torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6
    )


def test_prepend_diffusion_changes_only_new_stack():
    torch.manual_seed(2)
    config = _config(
        progressive={"building_mode": "prepend", "training_objective": "diffusion"},
        masking={"min_fraction": 0.2, "max_fraction": 0.6},
    )
    builder = ProgressiveRackBuilder(config, building_mode="prepend")
    trainer = ProgressiveTrainer(config, tokenizer_ids={"mask": VOCAB - 1})
    trainer.train_rack(builder, _data(), target_stacks=1)
    rack = builder.build_rack()
    before = {k: v.clone() for k, v in rack.state_dict().items()}
    res = trainer.train_rack(builder, _data(), target_stacks=2)
    after = rack.state_dict()
    changed = {k for k in after if k in before and not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("stacks.0.") for k in changed)  # the new, leftmost stack
    ratios = [h["mask_ratio"] for h in res["history"]]
    assert ratios == [0.2, 0.6]  # depth as time: the left stack sees the most masking
    assert res["history"][-1]["losses"][-1] < res["history"][-1]["losses"][0]


def test_qlora_trunk_adapters_train_and_quantized_weights_stay():
    torch.manual_seed(3)
    config = _config(
        progressive={"trunk_strategy": "qlora", "steps_per_stack": 10},
        qlora={"rank": 4, "alpha": 8.0, "dropout": 0.0, "lr": 1e-2},
    )
    builder = ProgressiveRackBuilder(config)
    trainer = ProgressiveTrainer(config)
    res = trainer.train_rack(builder, _data(), target_stacks=2)
    trunk = builder.rack.stacks[0]
    adapters = [m for m in trunk.modules() if isinstance(m, QLoRAAdapter)]
    assert adapters and all(isinstance(a.base_layer, QuantizedLinear) for a in adapters)
    assert any(a.lora_B.abs().sum() > 0 for a in adapters)  # B starts at zero: it trained
    assert "qlora_trunk" in res["history"][1]["param_groups"]
    packed = {id(a): a.base_layer.qweight.clone() for a in adapters}
    trainer.train_rack(builder, _data(), target_stacks=2)  # no-op: already 2 stacks
    assert all(torch.equal(packed[id(a)], a.base_layer.qweight) for a in adapters)


def test_training_errors():
    config = _config()
    builder = ProgressiveRackBuilder(config)
    trainer = ProgressiveTrainer(config)
    with pytest.raises(TrainingError, match="target_stacks must be an integer >= 1"):
        trainer.train_rack(builder, _data(), target_stacks=0)
    with pytest.raises(TrainingError, match="a batch must be a LongTensor"):
        trainer.train_rack(builder, [[1, 2, 3]], target_stacks=1)
    with pytest.raises(TrainingError, match="no batches"):
        ProgressiveTrainer(config).train_rack(ProgressiveRackBuilder(config), [], target_stacks=1)


@pytest.mark.parametrize("strategy", ["frozen", "qlora"])
def test_resume_from_stage_checkpoint_matches_uninterrupted(tmp_path, strategy):
    prog = {"target_stacks": 3, "steps_per_stack": 6, "trunk_strategy": strategy}
    cfg = dict(progressive=prog, qlora={"rank": 4, "alpha": 8.0, "dropout": 0.0})

    def config():
        deep = {"n_layers": 6, "architecture": {"n_stacks": 3, "blocks_per_stack": 2}}
        return _config(model=deep, **{k: dict(v) for k, v in cfg.items()})

    torch.manual_seed(5)
    full = ProgressiveTrainer(config()).train_rack(
        ProgressiveRackBuilder(config()), _data(), target_stacks=3
    )
    torch.manual_seed(5)
    first = ProgressiveTrainer(config(), checkpoint_dir=str(tmp_path / "ckpt"))
    first.train_rack(ProgressiveRackBuilder(config()), _data(), target_stacks=2)
    torch.manual_seed(123)  # a resumed process starts from another RNG state
    trainer, builder = ProgressiveTrainer.resume(str(tmp_path / "ckpt"), config())
    assert builder.n_stacks == 2 and len(trainer.history) == 2
    res = trainer.train_rack(builder, _data(), target_stacks=3)
    torch.testing.assert_close(
        torch.tensor(res["history"][2]["losses"]),
        torch.tensor(full["history"][2]["losses"]),
        rtol=1e-5,
        atol=1e-6,
    )


def test_corrupt_checkpoint_is_refused(tmp_path):
    config = _config(progressive={"steps_per_stack": 2})
    ProgressiveTrainer(config, checkpoint_dir=str(tmp_path)).train_rack(
        ProgressiveRackBuilder(config), _data(2), target_stacks=1
    )
    model = tmp_path / "stage-000" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0x55
    model.write_bytes(bytes(data))
    with pytest.raises(TrainingError, match="model.safetensors is corrupt"):
        ProgressiveTrainer.resume(str(tmp_path), config)
    with pytest.raises(TrainingError, match="no checkpoint to resume"):
        ProgressiveTrainer.resume(str(tmp_path / "empty"), config)


class _Recorder:
    def __init__(self):
        self.events = []

    def on_stage_start(self, info):
        self.events.append(("stage_start", info))

    def on_step(self, info):
        self.events.append(("step", info))

    def on_eval(self, info):
        self.events.append(("eval", info))

    def on_stage_end(self, record):
        self.events.append(("stage_end", record))


def test_callbacks_see_every_step_eval_and_stage():
    torch.manual_seed(0)
    config = _config(eval_every=4, progressive={"steps_per_stack": 10})
    rec = _Recorder()
    trainer = ProgressiveTrainer(config=config, callbacks=[rec])
    trainer.train_rack(
        ProgressiveRackBuilder(config=config), _data(), target_stacks=2, eval_loader=_data(1)
    )
    kinds = [k for k, _ in rec.events]
    assert kinds.count("stage_start") == 2 and kinds.count("stage_end") == 2
    steps = [i for k, i in rec.events if k == "step"]
    assert [s["global_step"] for s in steps] == list(range(1, 21))
    assert all(math.isfinite(s["loss"]) and s["lr"] > 0 and s["tokens"] > 0 for s in steps)
    evals = [(i["stage"], i["step"]) for k, i in rec.events if k == "eval"]
    assert evals == [(0, 4), (0, 8), (0, 10), (1, 4), (1, 8), (1, 10)]
    assert trainer.global_step == 20
