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
from utils import tiny_model

VOCAB = 24


def _config(model=None, **training):
    progressive = training.pop("progressive", {})
    mode = progressive.get("training_objective", "clm")
    return StackWiseConfig.from_dict(
        {
            "model": tiny_model(
                VOCAB,
                use_rope=True,
                attention_mode="causal" if mode == "clm" else "bidirectional",
                **(model or {}),
            ),
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
        # the base learning rate in stage 2 too, so float rounding is not amplified
        progressive = {"cache_activations": cache, "steps_per_stack": 12, "stage_lr_scale": 1.0}
        config = _config(progressive=progressive)
        builder = ProgressiveRackBuilder(config)
        res = ProgressiveTrainer(config).train_rack(builder, _data(), target_stacks=2)
        losses.append(res["history"][1]["losses"])
    torch.testing.assert_close(
        torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6
    )


def test_spilled_cache_read_ahead_gives_the_same_training(tmp_path):
    runs = {}
    cases = {
        "memory": {},
        "spill, read ahead": {"max_cache_size": 1, "spill_dir": str(tmp_path / "a"), "prefetch": 2},
        "spill, no read ahead": {
            "max_cache_size": 1,
            "spill_dir": str(tmp_path / "b"),
            "prefetch": 0,
        },
    }
    for name, caching in cases.items():
        torch.manual_seed(1)
        config = _config(progressive={"steps_per_stack": 12}, caching=caching)
        res = ProgressiveTrainer(config).train_rack(ProgressiveRackBuilder(config), _data(), 2)
        runs[name] = res["history"][1]
    for name in cases:
        assert runs[name]["losses"] == runs["memory"]["losses"], name
    ahead, plain = runs["spill, read ahead"]["cache"], runs["spill, no read ahead"]["cache"]
    assert ahead["prefetch_requests"] > 0 and plain["prefetch_requests"] == 0
    assert ahead["prefetch_hits"] + ahead["prefetch_late"] > 0
    assert plain["misses"] > 0 and plain["prefetch_hits"] == 0


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
    seen = {}

    class _AtStage1:  # the trunk is quantized and wrapped when stage 1 starts, before it trains
        def on_stage_start(self, info):
            if info["stage"] == 1:
                adapters = [
                    m for m in builder.rack.stacks[0].modules() if isinstance(m, QLoRAAdapter)
                ]
                seen["packed"] = [a.base_layer.qweight.clone() for a in adapters]
                seen["lora_B"] = [a.lora_B.detach().clone() for a in adapters]

    trainer = ProgressiveTrainer(config, callbacks=[_AtStage1()])
    res = trainer.train_rack(builder, _data(), target_stacks=2)
    adapters = [m for m in builder.rack.stacks[0].modules() if isinstance(m, QLoRAAdapter)]
    assert adapters and all(isinstance(a.base_layer, QuantizedLinear) for a in adapters)
    assert "qlora_trunk" in res["history"][1]["param_groups"]
    # The adapters trained during stage 1 (B starts at zero) ...
    assert all(b0.abs().sum() == 0 for b0 in seen["lora_B"])
    assert any(a.lora_B.abs().sum() > 0 for a in adapters)
    # ... while the quantized weights under them stayed exactly as they were quantized.
    assert all(
        torch.equal(p, a.base_layer.qweight) for p, a in zip(seen["packed"], adapters, strict=True)
    )


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


# ---- dual-LoRA, time embedding, autocast, seeding, step budget, accumulation -----------------


class _StageInfo:
    def __init__(self):
        self.stages = []

    def on_stage_start(self, info):
        self.stages.append(info)


def _three_stacks():
    return {"n_layers": 6, "architecture": {"n_stacks": 3, "blocks_per_stack": 2}}


def test_dual_lora_groups_lrs_ranks_and_gradients():
    config = _config(
        model=_three_stacks(),
        progressive={"trunk_strategy": "qlora", "target_stacks": 3, "steps_per_stack": 4},
        qlora={
            "rank": 4,
            "alpha": 8.0,
            "dropout": 0.0,
            "lr": 5e-3,
            "new_stack_lora": True,
            "progressive_rank": True,
            "rank_decay": 0.5,
            "min_rank": 1,
        },
    )
    rec = _StageInfo()
    builder = ProgressiveRackBuilder(config)
    ProgressiveTrainer(config, callbacks=[rec]).train_rack(builder, _data(), target_stacks=3)
    lr, qlr = 3e-3, 5e-3
    assert rec.stages[0]["group_lr"] == {
        "current_stack": lr,
        "current_stack_lora": qlr,
        "head": lr,
        "embeddings": lr,
    }
    later = lr * config.training.progressive.stage_lr_scale  # stages after the first
    for info in rec.stages[1:]:
        assert info["group_lr"] == pytest.approx(
            {"current_stack": later, "current_stack_lora": qlr, "head": later, "qlora_trunk": qlr}
        )
    rack = builder.build_rack()

    def adapters(i):
        return [m for m in rack.stacks[i].modules() if isinstance(m, QLoRAAdapter)]

    # Trunk: the stack's own LoRA was merged, NF4 trunk adapters took its place, of a rank
    # decaying with age (stack 1 is the newest trunk stack of the 3-stack plan).
    for i, rank in ((0, 2), (1, 4)):
        assert adapters(i) and all(isinstance(a.base_layer, QuantizedLinear) for a in adapters(i))
        assert {a.rank for a in adapters(i)} == {rank}
        assert {a.scaling for a in adapters(i)} == {2.0}
    # The stack in training keeps a full-precision LoRA beside its trainable weights.
    new = adapters(2)
    assert new and all(isinstance(a.base_layer, torch.nn.Linear) for a in new)
    assert all(a.base_layer.weight.requires_grad for a in new)
    # Every adapter trained (B starts at zero) and gets gradients.
    for i in range(3):
        assert all(float(a.lora_B.detach().abs().sum()) > 0 for a in adapters(i)), i
    rack.zero_grad(set_to_none=True)
    batch = _data(1)[0]["input_ids"]
    rack(batch).float().logsumexp(-1).mean().backward()
    for i in range(3):
        for a in adapters(i):
            assert a.lora_A.grad is not None and float(a.lora_A.grad.abs().sum()) > 0
            assert a.lora_B.grad is not None and float(a.lora_B.grad.abs().sum()) > 0


def _repeated(n_batches=8, b=8, s=16, seed=0):
    """Each sequence one token repeated: a masked position is any unmasked one (diffusion)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, VOCAB - 1, (b, 1), generator=g).expand(b, s).clone(),
            "sample_id": torch.arange(b) + i * b,
        }
        for i in range(n_batches)
    ]


def test_input_time_diffusion_learns_and_time_embedding_trains(tmp_path):
    from stackwise.model.architecture import load_rack, save_rack

    config = _config(
        max_steps=45,  # stage 0: 40 steps, stage 1: the 5 left
        progressive={
            "training_objective": "diffusion",
            "time_interpretation": "input",
            "steps_per_stack": 40,
        },
        masking={"min_fraction": 0.1, "max_fraction": 0.5},
    )
    builder = ProgressiveRackBuilder(config)
    rack = builder.rack
    te = rack.time_embedding
    assert te is not None
    init = {k: v.clone() for k, v in te.state_dict().items()}
    trainer = ProgressiveTrainer(config, tokenizer_ids={"mask": VOCAB - 1})
    data, held_out = _repeated(), _repeated(2, seed=9)
    res = trainer.train_rack(builder, data, target_stacks=1, eval_loader=held_out)
    assert "time_embedding" in res["history"][0]["param_groups"]
    assert res["history"][0]["eval_loss"] < 0.85 * math.log(VOCAB - 1)  # chance: log(23)
    assert all(not torch.equal(init[k], v) for k, v in te.state_dict().items())
    after_stage0 = {k: v.clone() for k, v in te.state_dict().items()}
    res = trainer.train_rack(builder, data, target_stacks=2, eval_loader=held_out)
    assert res["history"][1]["steps"] == 5
    assert res["history"][1]["eval_loss"] < 0.85 * math.log(VOCAB - 1)
    assert all(torch.equal(after_stage0[k], v) for k, v in te.state_dict().items())  # frozen
    # Gradients reach the embedding, and the noise level changes the prediction.
    ids = held_out[0]["input_ids"]
    t = torch.full((ids.shape[0],), 0.3)
    for p in te.parameters():
        p.requires_grad_(True)
    token_loss = torch.nn.functional.cross_entropy
    loss = token_loss(rack(ids, time=t).flatten(0, 1), ids.flatten())
    loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in te.parameters())
    with torch.no_grad():
        assert not torch.allclose(rack(ids, time=t), rack(ids, time=t + 0.5))
        save_rack(rack, tmp_path / "rack")
        loaded = load_rack(tmp_path / "rack")
        torch.testing.assert_close(loaded(ids, time=t), rack(ids, time=t))


def test_bf16_autocast_trains():
    config = _config(autocast=True, progressive={"steps_per_stack": 30})
    builder = ProgressiveRackBuilder(config)
    res = ProgressiveTrainer(config).train_rack(builder, _data(), target_stacks=1)
    losses = res["history"][0]["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.7 * losses[0]
    assert all(p.dtype == torch.float32 for p in builder.rack.parameters())


def test_training_seed_makes_runs_reproducible():
    def run(seed, outer):
        torch.manual_seed(outer)
        config = _config(seed=seed, model={"dropout": 0.1}, progressive={"steps_per_stack": 5})
        return ProgressiveTrainer(config).train_rack(
            ProgressiveRackBuilder(config), _data(), target_stacks=2
        )["history"]

    a, b, c = run(3, 0), run(3, 1), run(4, 0)
    assert [h["losses"] for h in a] == [h["losses"] for h in b]
    assert [h["losses"] for h in a] != [h["losses"] for h in c]


def test_max_steps_is_a_total_over_stages():
    config = _config(max_steps=10, progressive={"steps_per_stack": 6})
    res = ProgressiveTrainer(config).train_rack(ProgressiveRackBuilder(config), _data())
    assert [h["steps"] for h in res["history"]] == [6, 4] and res["stopped"] is None
    config = _config(max_steps=6, progressive={"steps_per_stack": 6})
    builder = ProgressiveRackBuilder(config)
    trainer = ProgressiveTrainer(config)
    res = trainer.train_rack(builder, _data())
    assert [h["steps"] for h in res["history"]] == [6] and res["stopped"] == "max_steps"
    assert builder.n_stacks == 1 and trainer.global_step == 6
    config = _config(max_steps=9, progressive={"steps_per_stack": None, "stage_budget": "uniform"})
    res = ProgressiveTrainer(config).train_rack(ProgressiveRackBuilder(config), _data())
    assert [h["steps"] for h in res["history"]] == [4, 5]
    config = _config(max_steps=9, progressive={"steps_per_stack": None})  # front_loaded default
    res = ProgressiveTrainer(config).train_rack(ProgressiveRackBuilder(config), _data())
    assert [h["steps"] for h in res["history"]] == [6, 3]


def test_gradient_accumulation_matches_one_big_batch():
    """2 micro-batches of B/2 == 1 batch of B, masked objective: the halves hold different
    numbers of target tokens, so each is weighted by its share."""
    full = _data(4)
    halves = []
    for b in full:
        for part in (slice(0, 4), slice(4, 8)):
            halves.append({"input_ids": b["input_ids"][part], "sample_id": b["sample_id"][part]})
    results = []
    for accum, data in ((1, full), (2, halves)):
        config = _config(
            optimizer={"grad_accumulation": accum, "weight_decay": 0.0, "grad_clip": 1.0},
            progressive={"training_objective": "diffusion", "steps_per_stack": 8},
            masking={"min_fraction": 0.3, "max_fraction": 0.3},
        )
        builder = ProgressiveRackBuilder(config)
        res = ProgressiveTrainer(config).train_rack(builder, data, target_stacks=1)
        results.append((res["history"][0], builder.rack.state_dict()))
    (h1, s1), (h2, s2) = results
    assert h1["tokens"] == h2["tokens"]
    torch.testing.assert_close(
        torch.tensor(h2["losses"]), torch.tensor(h1["losses"]), rtol=1e-5, atol=1e-6
    )
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-5)


# ---- errors ----------------------------------------------------------------------------------


def test_nan_loss_names_stage_stack_and_step():
    config = _config(progressive={"steps_per_stack": 3})
    builder = ProgressiveRackBuilder(config)
    trainer = ProgressiveTrainer(config)
    trainer.train_rack(builder, _data(), target_stacks=1)
    with torch.no_grad():
        builder.rack.final_norm.weight[3] = float("nan")
    with pytest.raises(
        TrainingError, match=r"loss is nan at step 0 while training stage 1 \(stack 1\)"
    ):
        trainer.train_rack(builder, _data(), target_stacks=2)


def _one(batch):
    return [batch]


@pytest.mark.parametrize(
    ("loader", "message"),
    [
        (_one(torch.arange(16)), r"input_ids must be an integer tensor \[B, S\]"),
        (_one(torch.zeros(2, 4, 3, dtype=torch.long)), r"must be an integer tensor \[B, S\]"),
        (_one(torch.zeros(2, 8)), r"integer tensor \[B, S\], got torch.float32"),
        (_one(torch.full((2, 8), VOCAB)), r"input_ids must be in \[0, 24\)"),
        (_one(torch.zeros(2, 40, dtype=torch.long)), "40 tokens exceed model.max_seq_len=32"),
        (_one(torch.zeros(0, 8, dtype=torch.long)), "input_ids is empty"),
        (_one({"ids": torch.zeros(2, 8, dtype=torch.long)}), "a dict with 'input_ids'"),
        (
            _one(
                {"input_ids": torch.zeros(2, 8, dtype=torch.long), "attention_mask": torch.ones(8)}
            ),
            r"attention_mask must be a tensor \[2, 8\], got \(8,\)",
        ),
        (
            _one({"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 7)}),
            r"labels must be an integer tensor \[2, 8\]",
        ),
        (
            _one({"input_ids": torch.zeros(2, 8, dtype=torch.long), "sample_id": [1, 2, 3]}),
            "sample_id must be 2 integers",
        ),
        ((b for b in _data(2)), "must be re-iterable"),
    ],
)
def test_bad_batches_raise_training_error(loader, message):
    config = _config(progressive={"steps_per_stack": 2})
    with pytest.raises(TrainingError, match=message):
        ProgressiveTrainer(config).train_rack(ProgressiveRackBuilder(config), loader, 1)


def test_input_time_needs_a_masked_objective():
    from stackwise.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="training.progressive.time_interpretation"):
        _config(progressive={"time_interpretation": "input"})
