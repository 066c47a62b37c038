"""Hierarchical Trainer on the counting task: each unit (block, stack, rack) learns; the cached
prefix gives the same losses as recomputing it; only the trained unit (and the head) change;
gradient accumulation matches a full batch; bf16 autocast; the modes' units; errors."""

from __future__ import annotations

import math

import pytest
import torch
from test_progressive import VOCAB, _config, _data

from stackwise.exceptions import ConfigurationError, TrainingError
from stackwise.model.architecture import Rack
from stackwise.training import Trainer

HALF_CHANCE = 0.5 * math.log(VOCAB - 1)  # chance: log(23) = 3.14


def _tail(record, n=5):
    return sum(record["losses"][-n:]) / n


def test_documented_snippet_units_learn():
    config = _config(max_steps=40, learning_rate=1e-2)
    trainer = Trainer(config=config)
    rack = trainer.rack
    block, stack = rack.stacks[0].blocks[0], rack.stacks[0]
    first = trainer.train_block(block, _data())
    assert _tail(first) < HALF_CHANCE and not first["cached_prefix"]
    assert first["param_groups"] == ["current_block", "head", "embeddings"]
    second = trainer.train_block(1, _data())  # on the cached output of block 0
    assert second["cached_prefix"] and second["param_groups"] == ["current_block", "head"]
    assert second["label"] == "block 1" and _tail(second) < HALF_CHANCE
    top = trainer.train_stack(rack.stacks[1], _data())
    assert top["cached_prefix"] and top["blocks"] == [2, 4] and _tail(top) < HALF_CHANCE
    assert Trainer(config).train_stack(stack, _data(), 2, rack=rack)["label"] == "stack 0"
    torch.manual_seed(0)
    fresh = Rack.from_config(config.model)
    whole = Trainer(config=config).train_rack(fresh, _data())
    assert whole["param_groups"] == ["blocks", "head", "embeddings"]
    assert _tail(whole) < HALF_CHANCE
    for rec in (first, second, top, whole):
        assert len(rec["losses"]) == rec["steps"] == 40 and len(rec["step_ms"]) == 40
        assert rec["tokens"] == 40 * 8 * 15 and rec["tokens_per_s"] > 0 and rec["wall_s"] > 0
        assert rec["peak_memory_bytes"] > 0
    assert len(trainer.history) == 3


def test_cached_prefix_matches_recomputed_prefix():
    losses = []
    for cache in (True, False):
        torch.manual_seed(1)
        trainer = Trainer(_config(max_steps=10), rack=None, cache_activations=cache)
        trainer.train_block(0, _data())
        rec = trainer.train_stack(1, _data(), max_steps=12)
        assert rec["cached_prefix"] is cache
        assert (rec["cache"] is not None) is cache
        losses.append(rec["losses"])
    torch.testing.assert_close(
        torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("kind", "prefix"), [("block", "stacks.1.blocks.0."), ("stack", "stacks.1.")]
)
def test_only_the_trained_unit_and_head_change(kind, prefix):
    torch.manual_seed(2)
    trainer = Trainer(_config(max_steps=5))
    trainer.train_block(0, _data())
    before = {k: v.clone() for k, v in trainer.rack.state_dict().items()}
    if kind == "block":
        trainer.train_block(2, _data())
    else:
        trainer.train_stack(1, _data())
    after = trainer.rack.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith(prefix) for k in changed)
    assert all(k.startswith((prefix, "final_norm.")) for k in changed), sorted(changed)


def test_grad_accumulation_matches_full_batch():
    full = _data(4, b=8)
    for batch in full:  # unequal padding: the halves hold different numbers of loss tokens
        mask = torch.ones_like(batch["input_ids"], dtype=torch.bool)
        mask[:3, 9:] = False
        batch["attention_mask"] = mask
    halves = []
    for batch in full:
        for part in (slice(0, 4), slice(4, 8)):
            halves.append({k: v[part] for k, v in batch.items()})
    states, losses = [], []
    for accum, data in ((1, full), (2, halves)):
        # SGD without clipping: unlike AdamW it sees a wrongly scaled accumulated gradient.
        opt = {"name": "sgd", "grad_accumulation": accum, "grad_clip": 0.0, "weight_decay": 0.0}
        config = _config(max_steps=4, learning_rate=0.1, optimizer=opt)
        torch.manual_seed(3)
        rack = Rack.from_config(config.model)
        rec = Trainer(config).train_rack(rack, data)
        assert rec["steps"] == 4 and len(rec["losses"]) == 4
        states.append(rack.state_dict())
        losses.append(torch.tensor(rec["losses"]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_trains():
    results = []
    for autocast in (False, True):
        torch.manual_seed(4)
        rec = Trainer(_config(max_steps=4, autocast=autocast)).train_rack(None, _data())
        assert all(math.isfinite(v) for v in rec["losses"])
        results.append(rec["losses"])
    assert results[1][-1] < results[1][0]
    assert results[0] != results[1]  # the bf16 path really ran


def test_nan_loss_names_step_and_unit():
    trainer = Trainer(_config(max_steps=3))
    trainer.train_block(0, _data())
    with torch.no_grad():
        trainer.rack.stacks[0].blocks[1].ffn.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=r"loss is nan at step 0 .*block 1"):
        trainer.train_block(1, _data())
    with pytest.raises(TrainingError, match=r"loss is nan at step 0 .*stack 0"):
        Trainer(_config(max_steps=3)).train_stack(0, _data(), rack=trainer.rack)


def test_modes_choose_the_units():
    expected = {
        "layerwise": [[0, 1], [1, 2], [2, 3], [3, 4]],
        "blockwise": [[0, 3], [3, 4]],
        "stackwise": [[0, 2], [2, 4]],
        "end_to_end": [[0, 4]],
        "rackwise": [[0, 4]],
    }
    ids = [b["input_ids"] for b in _data(2)]  # plain LongTensor batches
    for mode, blocks in expected.items():
        config = _config(max_steps=2 * len(blocks), block_size=3)
        config.training.mode = mode
        res = Trainer(config).train(config, ids)
        assert [r["blocks"] for r in res["history"]] == blocks, mode
        assert all(r["steps"] == 2 for r in res["history"])
        assert isinstance(res["rack"], Rack)


def test_padded_dict_batches():
    batches = []
    for b in _data(3):
        mask = torch.ones_like(b["input_ids"], dtype=torch.bool)
        mask[:, 12:] = False
        batches.append({"input_ids": b["input_ids"], "attention_mask": mask})
    rec = Trainer(_config(max_steps=4)).train_stack(0, batches)
    assert rec["tokens"] == 4 * 8 * 11  # targets on padding are ignored
    assert all(math.isfinite(v) for v in rec["losses"])


def test_errors():
    config = _config(max_steps=2)
    trainer = Trainer(config)
    with pytest.raises(TrainingError, match="no batches"):
        trainer.train_block(0, [])
    with pytest.raises(
        TrainingError, match=r"batch 0: input_ids must be an integer tensor \[B, S\]"
    ):
        trainer.train_block(0, [torch.zeros(2, 3, 4, dtype=torch.long)])
    with pytest.raises(TrainingError, match="input_ids must be"):
        trainer.train_block(0, [torch.zeros(2, 8)])  # float ids
    mask = torch.ones(8, 15, dtype=torch.bool)
    with pytest.raises(
        TrainingError, match=r"attention_mask must be a tensor \[8, 16\], got \(8, 15\)"
    ):
        trainer.train_block(0, [{"input_ids": _data(1)[0]["input_ids"], "attention_mask": mask}])
    with pytest.raises(TrainingError, match="exceed model.max_seq_len=32"):
        trainer.train_block(0, [torch.zeros(2, 40, dtype=torch.long)])
    with pytest.raises(TrainingError, match=r"input_ids must be in \[0, 24\)"):
        trainer.train_block(0, [torch.full((2, 8), 99)])
    with pytest.raises(TrainingError, match="a batch must be a LongTensor"):
        trainer.train_block(0, [[1, 2, 3]])
    with pytest.raises(TrainingError, match="must be re-iterable"):
        trainer.train_block(0, iter(_data()))
    with pytest.raises(TrainingError, match="block index 9 is outside 0..3"):
        trainer.train_block(9, _data())
    stranger = Rack.from_config(config.model).stacks[0]
    with pytest.raises(TrainingError, match="not a stack of the trainer's rack"):
        trainer.train_stack(stranger, _data())
    timed = Rack.from_config(config.model, time_embedding=True)
    with pytest.raises(TrainingError, match="rack is time-conditioned"):
        trainer.train_rack(timed, _data())
    config.training.mode = "sideways"
    with pytest.raises(ConfigurationError, match="training.mode: 'sideways' is not one of"):
        Trainer(config)


def test_fused_mode_delegates_to_the_fusion_trainer(tmp_path):
    config = _config(max_steps=4, block_size=2, checkpointing={"dir": str(tmp_path)})
    config.training.mode = "fused"
    trainer = Trainer(config)
    res = trainer.train(None, _data(2), max_steps=2)
    assert [r["label"] for r in res["history"]] == ["fusion block 0", "fusion block 1"]
    assert res["rack"] is trainer.rack and len(trainer.history) == 2
    assert (tmp_path / "backups" / res["run_id"] / "metadata.json").is_file()


def test_diffusion_ratio_grows_with_depth():
    config = _config(
        max_steps=8,
        progressive={"training_objective": "diffusion"},
        masking={"min_fraction": 0.2, "max_fraction": 0.8},
    )
    trainer = Trainer(config, tokenizer_ids={"mask": VOCAB - 1})
    res = trainer.train(None, _data(2))
    assert [round(r["mask_ratio"], 6) for r in res["history"]] == [0.2, 0.4, 0.6, 0.8]
    assert all(math.isfinite(v) for r in res["history"] for v in r["losses"])
