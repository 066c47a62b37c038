"""QuantizationManager and QLoRAAdapter: conversion of a model, memory footprint, restore,
adapter identity at start, gradients only to A and B, merge/unmerge, a short fit, state_dict and
the PEFT layout."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from stackwise.exceptions import QuantizationError
from stackwise.model import QuantizedLinear
from stackwise.training.core.fusion_trainer import (
    QLoRAAdapter,
    load_peft_adapters,
    save_peft_adapters,
)
from stackwise.training.strategies.quantization import QuantizationManager


class Tiny(nn.Module):
    def __init__(self, d=128, ff=256):
        super().__init__()
        self.embed = nn.Embedding(100, d)
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, ff)
        self.down = nn.Linear(ff, d)

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        return self.down(torch.relu(self.up(h)))


@pytest.mark.parametrize(
    "precision", ["full", "half", "fp16", "bf16", "int8", "nf4", "fp8", "fp8_e5m2"]
)
def test_convert_to_precision_runs_and_shrinks(precision):
    torch.manual_seed(0)
    model = Tiny()
    ids = torch.randint(0, 100, (2, 7))
    before = model(ids)
    mgr = QuantizationManager(precision="fp16")
    full_bytes = mgr.memory_footprint(model)
    out = mgr.convert_to_precision(model, precision)
    assert out is model
    after = model(ids)
    assert after.shape == before.shape and torch.isfinite(after).all()
    if precision == "full":
        assert isinstance(model.up, nn.Linear)
    else:
        assert isinstance(model.up, QuantizedLinear) and isinstance(model.down, QuantizedLinear)
        assert mgr.memory_footprint(model) < full_bytes
    assert model.norm.weight.dtype == torch.float32  # norms and embeddings stay fp32
    mgr.restore(model)
    assert isinstance(model.up, nn.Linear)
    torch.testing.assert_close(model(ids), before)


def test_gpt2_small_shaped_stack_nf4_ratio():
    # One GPT-2-small block's linear layers (768 -> 3*768, 768 -> 768, 768 -> 3072, 3072 -> 768).
    block = nn.ModuleDict(
        {
            "qkv": nn.Linear(768, 2304),
            "proj": nn.Linear(768, 768),
            "fc": nn.Linear(768, 3072),
            "out": nn.Linear(3072, 768),
        }
    )
    mgr = QuantizationManager()
    fp16_bytes = sum(p.numel() * 2 for p in block.parameters())
    mgr.convert_to_precision(block, "nf4")
    ratio = mgr.memory_footprint(block) / fp16_bytes
    assert ratio <= 0.3, ratio


def test_unknown_precision_and_bad_layer():
    with pytest.raises(QuantizationError, match="unknown precision 'int4'"):
        QuantizationManager(precision="int4")
    model = nn.Sequential(nn.Linear(10, 3))
    with pytest.raises(QuantizationError, match="layer 0: .*not a multiple of block_size"):
        QuantizationManager().convert_to_precision(model, "nf4")


def test_module_that_declares_its_conversion():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64)
            self.seen = None

        def convert_precision(self, precision, manager):
            self.seen = precision
            return None

    model = nn.Sequential(Custom())
    QuantizationManager().convert_to_precision(model, "nf4")
    assert model[0].seen == "nf4"


def _adapter(seed=0, dropout=0.0, quantization="nf4"):
    torch.manual_seed(seed)
    return QLoRAAdapter(
        nn.Linear(128, 64), rank=8, alpha=16.0, dropout=dropout, quantization=quantization
    )


def test_adapter_starts_as_base_and_trains_only_a_b():
    a = _adapter()
    x = torch.randn(4, 128)
    torch.testing.assert_close(a(x), a.base_layer(x))
    assert isinstance(a.base_layer, QuantizedLinear)
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["lora_A", "lora_B"]
    a(x).pow(2).sum().backward()
    assert a.lora_B.grad is not None and a.lora_B.grad.abs().sum() > 0
    assert a.get_adaptation_parameters() == [a.lora_A, a.lora_B]


@pytest.mark.parametrize("quantization", ["nf4", None])
def test_merge_unmerge_restores(quantization):
    a = _adapter(quantization=quantization)
    with torch.no_grad():
        a.lora_B.normal_()
    x = torch.randn(3, 128)
    y = a(x)
    base_before = {k: v.clone() for k, v in a.base_layer.state_dict().items()}
    a.merge()
    torch.testing.assert_close(a(x), y, rtol=1e-4, atol=1e-4)
    a.unmerge()
    for k, v in a.base_layer.state_dict().items():
        if quantization == "nf4":
            assert torch.equal(v, base_before[k]), k
        else:
            torch.testing.assert_close(v, base_before[k], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a(x), y)


def test_short_fit_reduces_loss():
    torch.manual_seed(1)
    a = _adapter(dropout=0.1)
    target = nn.Linear(128, 64)
    x = torch.randn(256, 128)
    with torch.no_grad():
        y = target(x)
    opt = torch.optim.Adam(a.get_adaptation_parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = (a(x) - y).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    a.eval()
    assert (a(x) - y).pow(2).mean().item() < 0.7 * first


def test_state_dict_and_peft_layout(tmp_path):
    model = nn.Sequential()
    model.add_module("q_proj", _adapter(seed=2))
    model.add_module("v_proj", _adapter(seed=3))
    with torch.no_grad():
        model.q_proj.lora_B.normal_()
    sd = model.state_dict()
    assert "q_proj.lora_A" in sd and "q_proj.base_layer.qweight" in sd
    out = save_peft_adapters(model, tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16.0
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert set(tensors) == {
        "base_model.model.q_proj.lora_A.weight",
        "base_model.model.q_proj.lora_B.weight",
        "base_model.model.v_proj.lora_A.weight",
        "base_model.model.v_proj.lora_B.weight",
    }
    other = nn.Sequential()
    other.add_module("q_proj", _adapter(seed=4))
    other.add_module("v_proj", _adapter(seed=5))
    load_peft_adapters(other, out)
    torch.testing.assert_close(other.q_proj.lora_B, model.q_proj.lora_B)


def test_peft_can_read_the_layout(tmp_path):
    peft = pytest.importorskip("peft")
    model = nn.Sequential()
    model.add_module("q_proj", _adapter())
    out = save_peft_adapters(model, tmp_path / "adapter")
    config = peft.LoraConfig.from_pretrained(str(out))
    assert config.r == 8


def test_adapter_errors():
    with pytest.raises(QuantizationError, match="rank must be a positive int"):
        QLoRAAdapter(nn.Linear(64, 64), rank=0)
    with pytest.raises(QuantizationError, match="must be nn.Linear or QuantizedLinear"):
        QLoRAAdapter(nn.Conv1d(4, 4, 1))
