"""MLGKALayer on the native ops against the same weights in plain PyTorch, for every attention
type and mode; causality; padding; and the Rack (forward_from, save/load, checksums)."""

from __future__ import annotations

import pytest
import torch

from stackwise.config.base import StackWiseConfig
from stackwise.exceptions import CacheCorruptionError, ModelError
from stackwise.model.architecture import Rack, create_gpt2_model, load_rack, save_rack
from stackwise.model.mlgka import MLGKALayer
from utils import tiny_model

TYPES = [
    ("standard", {}),
    ("gqa", {"n_kv_heads": 2}),
    ("mla", {"kv_rank": 24, "rope_head_dim": 8}),
    ("mla", {"kv_rank": 24, "rope_head_dim": 8, "q_rank": 16, "v_head_dim": 12}),
    ("kernel", {"kernel_type": "elu"}),
    ("kernel", {"kernel_type": "softmax", "kernel_dim": 32}),
    ("mlgka", {"n_kv_heads": 2, "kv_rank": 24}),
    ("mlgka", {"n_kv_heads": 2, "kv_rank": 24, "kernel_type": "relu"}),
]


def _layer(attention_type, kwargs, mode, use_rope=True, seed=0):
    torch.manual_seed(seed)
    kw = dict(kwargs)
    n_kv = kw.pop("n_kv_heads", None)
    return MLGKALayer(
        d_model=64,
        n_heads=4,
        n_kv_heads=n_kv,
        d_ff=96,
        attention_type=attention_type,
        attention_mode=mode,
        use_rope=use_rope and attention_type != "kernel",
        **kw,
    )


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
@pytest.mark.parametrize(
    "attention_type,kwargs", TYPES, ids=[f"{t}{i}" for i, (t, _) in enumerate(TYPES)]
)
def test_native_matches_reference(attention_type, kwargs, mode):
    layer = _layer(attention_type, kwargs, mode)
    x = torch.randn(2, 11, 64, requires_grad=True)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 8:] = False
    y = layer(x, key_padding_mask=mask)
    layer.set_reference(True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = layer(x2, key_padding_mask=mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], g, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, [x2, *layer.parameters()], g, allow_unused=True)
    for a, b in zip(grads, grads_ref, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "attention_type,kwargs", TYPES, ids=[f"{t}{i}" for i, (t, _) in enumerate(TYPES)]
)
def test_causal_is_causal(attention_type, kwargs):
    layer = _layer(attention_type, kwargs, "causal")
    x = torch.randn(1, 9, 64)
    y = layer(x)
    x2 = x.clone()
    x2[0, 5] += 1.0
    y2 = layer(x2)
    torch.testing.assert_close(y[0, :5], y2[0, :5], rtol=0, atol=1e-6)
    assert (y[0, 5:] - y2[0, 5:]).abs().max() > 1e-4


def test_padding_keys_do_not_leak():
    layer = _layer("gqa", {"n_kv_heads": 2}, "bidirectional")
    x = torch.randn(1, 8, 64)
    mask = torch.tensor([[True] * 6 + [False] * 2])
    y = layer(x, key_padding_mask=mask)
    x2 = x.clone()
    x2[0, 6:] = torch.randn(2, 64)
    y2 = layer(x2, key_padding_mask=mask)
    torch.testing.assert_close(y[0, :6], y2[0, :6], rtol=0, atol=1e-6)


def _tiny_config(**model):
    return StackWiseConfig.from_dict(
        {"model": tiny_model(101, **model), "training": {"seq_len": 16}}
    ).validate()


def test_rack_forward_hidden_and_forward_from():
    cfg = _tiny_config()
    torch.manual_seed(0)
    rack = Rack.from_config(cfg.model).validate()
    ids = torch.randint(0, 101, (2, 10))
    logits, hidden = rack(ids, return_hidden=True)
    assert logits.shape == (2, 10, 101) and len(hidden) == 3
    h1 = rack.forward_from(hidden[1], start_stack=1)
    torch.testing.assert_close(rack.logits(h1), logits)
    assert rack.num_parameters() > rack.num_parameters(trainable_only=True) - 1
    rack.set_attention_mode("bidirectional")
    assert all(b.attention_mode == "bidirectional" for s in rack.stacks for b in s.blocks)
    with pytest.raises(ModelError, match="outside"):
        rack.forward_from(hidden[0], start_stack=3)
    assert len(create_gpt2_model(cfg.model)) == 4


def test_rack_save_load_round_trip_and_checksum(tmp_path):
    cfg = _tiny_config(use_rope=True, attention_type="gqa", n_kv_heads=2)
    torch.manual_seed(1)
    rack = Rack.from_config(cfg.model)
    out = save_rack(rack, tmp_path / "rack")
    back = load_rack(out)
    ids = torch.randint(0, 101, (1, 7))
    torch.testing.assert_close(back(ids), rack(ids), rtol=0, atol=0)
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CacheCorruptionError, match="model.safetensors"):
        load_rack(out)
