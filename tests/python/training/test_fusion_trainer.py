"""FusionTrainer on the counting task: frozen backbone (converted, unchanged, backed up, cached),
trainable QLoRA backbone (quantized weights fixed, adapters train), the optimizer's groups,
custom layers, dual LoRA, the documented snippets, errors."""

from __future__ import annotations

import math

import pytest
import torch
from test_progressive import VOCAB, _config, _data
from torch import nn

from stackwise.config.base import QLoRAConfig
from stackwise.exceptions import ConfigurationError, TrainingError
from stackwise.model.architecture import _layer_kwargs
from stackwise.model.mlgka import MLGKALayer
from stackwise.model.quantized import QuantizedLinear
from stackwise.training import FusionTrainer
from stackwise.training.core.fusion_trainer import QLoRAAdapter

HALF_CHANCE = 0.5 * math.log(VOCAB - 1)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _fusion_config(tmp_path, **training):
    base = {
        "max_steps": 60,
        "learning_rate": 1e-2,
        "block_size": 1,
        "total_blocks": 3,
        "checkpointing": {"dir": str(tmp_path)},
        "qlora": {"rank": 4, "alpha": 8.0, "dropout": 0.0, "lr": 1e-2},
    }
    return _config(**{**base, **training})


def _linears(block):
    return {n.rsplit(".", 1)[-1]: m for n, m in block.named_modules() if n.endswith(LINEARS)}


class _AtUnitStart:
    """Calls ``fn`` when the unit named ``label`` starts."""

    def __init__(self, label, fn):
        self.label, self.fn, self.value = label, fn, None

    def on_unit_start(self, info):
        if info["label"] == self.label:
            self.value = self.fn()


def test_frozen_backbone_trains_each_block_in_turn(tmp_path):
    config = _fusion_config(tmp_path, fusion_mode="frozen", quantization_type="fp16")
    trainer = FusionTrainer(config, dataloader=_data(), run_id="frozen-run")
    snap = _AtUnitStart(
        "fusion block 2",
        lambda: [{k: v.clone() for k, v in b.state_dict().items()} for b in trainer.blocks[:2]],
    )
    trainer.callbacks.append(snap)
    res = trainer.train_with_frozen_backbone()
    hist = res["history"]
    assert [r["label"] for r in hist] == ["fusion block 0", "fusion block 1", "fusion block 2"]
    assert [r["cached_prefix"] for r in hist] == [False, True, True]
    assert hist[0]["param_groups"] == ["current_block", "head", "embeddings"]
    assert hist[2]["param_groups"] == ["current_block", "head"]
    assert sum(hist[2]["losses"][-5:]) / 5 < HALF_CHANCE
    # The backbone did not move while block 2 trained.
    for before, block in zip(snap.value, trainer.blocks[:2], strict=True):
        after = block.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    # Converted from exactly the weights that were backed up first.
    backup = trainer._restore_full_precision_weights_from_disk(block_indices=[0, 1])
    for idx in (0, 1):
        for name, layer in _linears(trainer.blocks[idx]).items():
            assert isinstance(layer, QuantizedLinear) and layer.precision == "fp16", name
            key = next(k for k in backup[idx] if k.endswith(f"{name}.weight"))
            assert torch.equal(layer.qweight, backup[idx][key].half())
    assert all(isinstance(m, nn.Linear) for m in _linears(trainer.blocks[2]).values())
    assert res["backup_dir"].endswith("backups/frozen-run")
    # Bringing block 0 back to full precision restores the backed-up weights exactly.
    trainer.restore_full_precision_blocks([0])
    state = trainer.blocks[0].state_dict()
    assert all(torch.equal(state[k], v) for k, v in backup[0].items())
    assert all(isinstance(m, nn.Linear) for m in _linears(trainer.blocks[0]).values())


def test_trainable_backbone_adapters_train_and_quantized_weights_stay(tmp_path):
    config = _fusion_config(
        tmp_path, fusion_mode="trainable", quantization_type="nf4", total_blocks=2, max_steps=50
    )
    trainer = FusionTrainer(config, dataloader=_data())

    def adapters():
        return [m for m in trainer.blocks[0].modules() if isinstance(m, QLoRAAdapter)]

    snap = _AtUnitStart(
        "fusion block 1",
        lambda: [(a.base_layer.qweight.clone(), a.lora_B.detach().clone()) for a in adapters()],
    )
    trainer.callbacks.append(snap)
    res = trainer.train()
    assert res["history"][1]["param_groups"] == ["current_block", "qlora_backbone", "head"]
    assert res["history"][1]["cached_prefix"] is False  # adapters train: the backbone reruns
    found = adapters()
    assert len(found) == 7 and all(a.base_layer.precision == "nf4" for a in found)
    for (qweight, lora_b), a in zip(snap.value, found, strict=True):
        assert torch.equal(qweight, a.base_layer.qweight)
        assert not torch.equal(lora_b, a.lora_B)  # B started at zero and trained
    assert sum(res["history"][1]["losses"][-5:]) / 5 < HALF_CHANCE


def test_setup_fusion_optimizer_groups_and_learning_rates(tmp_path):
    config = _fusion_config(tmp_path, learning_rate=5e-4, qlora={"lr": 1e-5, "rank": 4})
    trainer = FusionTrainer(config)
    all_blocks = trainer.blocks
    optimizer = trainer._setup_fusion_optimizer(
        trainable_blocks=all_blocks, qlora_enabled=True, current_block_idx=1
    )
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["current_block", "qlora_backbone", "head"]
    assert groups["qlora_backbone"]["lr"] == 1e-5 and groups["current_block"]["lr"] == 5e-4
    lora = {id(p) for m in all_blocks[0].modules() if isinstance(m, QLoRAAdapter) for p in
            m.get_adaptation_parameters()}  # fmt: skip
    assert {id(p) for p in groups["qlora_backbone"]["params"]} == lora and len(lora) == 14
    assert {id(p) for p in groups["current_block"]["params"]} == {
        id(p) for p in all_blocks[1].parameters()
    }
    assert not any(p.requires_grad for p in all_blocks[2].parameters())  # later: untouched
    assert trainer.retired == [True, False, False]  # block 0 was backed up, then converted
    first = trainer._setup_fusion_optimizer(all_blocks, qlora_enabled=False, current_block_idx=0)
    assert [g["name"] for g in first.param_groups] == ["current_block", "head", "embeddings"]
    assert QLoRAConfig().lr == 1e-4  # the configured default backbone learning rate
    with pytest.raises(TrainingError, match="current_block_idx 5 is outside 0..2"):
        trainer._setup_fusion_optimizer(all_blocks, qlora_enabled=True, current_block_idx=5)


def test_custom_layers_learn(tmp_path):
    config = _fusion_config(tmp_path, max_steps=50)
    layers = [MLGKALayer(seed=i, **_layer_kwargs(config.model)) for i in range(2)]
    trainer = FusionTrainer(config, dataloader=_data())
    res = trainer.train_with_custom_model(layers)
    assert [s.blocks[0] for s in res["model"].stacks] == layers
    assert len(res["history"]) == 2
    assert sum(res["history"][-1]["losses"][-5:]) / 5 < HALF_CHANCE


def test_dual_lora_trains_the_new_block_with_its_own_adapters(tmp_path):
    config = _fusion_config(
        tmp_path,
        total_blocks=2,
        max_steps=20,
        quantization_type="bf16",
        qlora={"rank": 4, "alpha": 8.0, "dropout": 0.0, "lr": 2e-3, "new_stack_lora": True},
    )
    trainer = FusionTrainer(config, dataloader=_data())
    assert trainer.dual_lora  # from training.qlora.new_stack_lora
    merged = {}

    class _MergedWeights:
        def on_unit_end(self, record):
            if record["label"] == "fusion block 0":
                for name, m in trainer.blocks[0].named_modules():
                    if isinstance(m, QLoRAAdapter):
                        merged[name] = (m.base_layer.weight + m.delta_weight()).detach().clone()

    trainer.callbacks.append(_MergedWeights())
    before = {n: m.weight.clone() for n, m in _linears(trainer.blocks[1]).items()}
    res = trainer.train()
    assert res["history"][1]["param_groups"] == ["current_block", "current_block_lora", "head"]
    assert len(merged) == 7
    # Block 0 joined the backbone with its LoRA merged: the backup holds W + BA·s, and the
    # backbone was converted from it.
    backup = trainer._restore_full_precision_weights_from_disk(block_indices=[0])[0]
    for name, weight in merged.items():
        torch.testing.assert_close(backup[f"{name}.weight"], weight, rtol=1e-6, atol=1e-6)
        layer = trainer.blocks[0].get_submodule(name)
        assert isinstance(layer, QuantizedLinear) and layer.precision == "bf16"
    # Block 1 trained, its weights and its adapters (B starts at zero) both.
    for name, adapter in _linears(trainer.blocks[1]).items():
        assert isinstance(adapter, QLoRAAdapter)
        assert not torch.equal(adapter.base_layer.weight, before[name])
        assert adapter.lora_B.abs().sum() > 0
    assert res["history"][1]["losses"][-1] < res["history"][1]["losses"][0]


def test_documented_snippets(tmp_path, monkeypatch):
    monkeypatch.setenv("STACKWISE_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "corpus.txt"
    text.write_text("".join(chr(97 + (i % 26)) for i in range(6000)))
    config = _fusion_config(
        tmp_path,
        max_steps=3,
        run_id="my_experiment",
        quantization_type="fp16",
    )
    config.model.vocab_size = 259  # the byte tokenizer
    config.data.corpus, config.data.tokenizer = str(text), "bytes"

    trainer = FusionTrainer(config)
    assert len(trainer.train_with_frozen_backbone()["history"]) == 3  # the config's corpus

    trainer = FusionTrainer(config)
    trained_blocks = trainer.blocks
    weights = [{k: v.clone() for k, v in b.state_dict().items()} for b in trained_blocks]
    trainer._save_full_precision_weights_to_disk(trained_blocks, "fp16")
    restored = trainer._restore_full_precision_weights_from_disk(
        run_id="my_experiment", cache_precision="fp16", block_indices=[0, 1, 2]
    )
    for i in range(3):
        for k, v in weights[i].items():
            torch.testing.assert_close(restored[i][k], v, rtol=1e-3, atol=1e-5)
    all_blocks = trainer.blocks
    optimizer = trainer._setup_fusion_optimizer(
        trainable_blocks=all_blocks, qlora_enabled=True, current_block_idx=1
    )
    assert [g["name"] for g in optimizer.param_groups][:2] == ["current_block", "qlora_backbone"]
    layers = [MLGKALayer(seed=i, **_layer_kwargs(config.model)) for i in range(2)]
    assert len(FusionTrainer(config).train_with_custom_model(layers)["history"]) == 2


def test_errors(tmp_path):
    config = _fusion_config(tmp_path, max_steps=2)
    with pytest.raises(TrainingError, match="no batches"):
        FusionTrainer(config, dataloader=[]).train()
    trainer = FusionTrainer(config, dataloader=_data(1))
    trainer.train()
    with pytest.raises(TrainingError, match="block 0 is already converted"):
        trainer._save_full_precision_weights_to_disk(trainer.blocks[:1], "fp32")
    with pytest.raises(TrainingError, match="no weight backup at .*nobody"):
        trainer._restore_full_precision_weights_from_disk(run_id="nobody")
    wide = MLGKALayer(d_model=64, n_heads=4, n_kv_heads=4, d_ff=64)
    with pytest.raises(TrainingError, match="layer 0 must be an MLGKALayer of d_model 32"):
        trainer.train_with_custom_model([wide])
    with pytest.raises(TrainingError, match="model must be a Rack, a list of layers or None"):
        FusionTrainer(config, model="rack")
    config.training.fusion_mode = "melted"
    with pytest.raises(ConfigurationError, match="training.fusion_mode: 'melted' is not one of"):
        FusionTrainer(config)


def test_qlora_optimizer_adapts_a_backbone_converted_frozen(tmp_path):
    config = _fusion_config(tmp_path, max_steps=3, quantization_type="int8")
    trainer = FusionTrainer(config, dataloader=_data(1))
    trainer.train_with_frozen_backbone()
    packed = trainer.blocks[0].blocks[0].attn.q_proj.qweight.clone()
    optimizer = trainer._setup_fusion_optimizer(trainer.blocks, True, 2)
    assert [g["name"] for g in optimizer.param_groups] == [
        "current_block",
        "qlora_backbone",
        "head",
    ]
    adapter = trainer.blocks[0].blocks[0].attn.q_proj
    assert isinstance(adapter, QLoRAAdapter) and adapter.base_layer.precision == "int8"
    assert torch.equal(adapter.base_layer.qweight, packed)  # wrapped as it was, not requantized
