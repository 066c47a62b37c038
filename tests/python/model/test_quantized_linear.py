"""QuantizedLinear: conversion from nn.Linear, forward/backward against the dequantized weight,
state_dict and safetensors round trips as packed bytes, and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stackwise.exceptions import QuantizationError
from stackwise.model import QuantizedLinear

PRECISIONS = ["nf4", "int8", "fp8_e4m3", "fp8_e5m2", "fp16", "bf16"]


def _linear(n_in=128, n_out=64, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_from_linear_forward_matches_dequantized(precision):
    lin = _linear()
    q = QuantizedLinear.from_linear(lin, precision)
    w = q.dequantize()
    x = torch.randn(5, 128, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ w.t() + lin.bias, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(5, 128), rtol=1e-4, atol=1e-4)
    # The weight error is what the format allows.
    err = (w - lin.weight).abs().max().item()
    bound = {
        "nf4": 0.2,
        "int8": 0.01,
        "fp8_e4m3": 0.07,
        "fp8_e5m2": 0.13,
        "fp16": 1e-3,
        "bf16": 1e-2,
    }[precision]
    assert err < bound * lin.weight.abs().max().item()
    assert not any(p.requires_grad for p in q.parameters())


def test_state_dict_holds_packed_bytes_and_round_trips(tmp_path):
    from safetensors.torch import load_file, save_file

    q = QuantizedLinear.from_linear(_linear(), "nf4")
    sd = q.state_dict()
    assert sd["qweight"].dtype == torch.uint8 and sd["qweight"].numel() == 64 * 128 // 2
    assert sd["scales"].dtype == torch.float32
    assert not any(t.dtype == torch.float32 and t.numel() == 64 * 128 for t in sd.values())
    save_file(sd, str(tmp_path / "q.safetensors"))
    fresh = QuantizedLinear(128, 64, "nf4")
    fresh.load_state_dict(load_file(str(tmp_path / "q.safetensors")))
    x = torch.randn(3, 128)
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)


def test_load_refuses_other_format():
    sd = QuantizedLinear.from_linear(_linear(), "int8").state_dict()
    with pytest.raises(QuantizationError, match="checkpoint holds int8"):
        QuantizedLinear(128, 64, "nf4").load_state_dict(sd)


def test_memory_is_a_fraction_of_fp16():
    q = QuantizedLinear.from_linear(_linear(768, 768), "nf4")
    nbytes = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert nbytes / (768 * 768 * 2 + 768 * 4) < 0.3


def test_errors():
    with pytest.raises(QuantizationError, match="unknown precision 'nf5'"):
        QuantizedLinear(64, 64, "nf5")
    with pytest.raises(QuantizationError, match="not a multiple of block_size 64"):
        QuantizedLinear.from_linear(nn.Linear(7, 9), "nf4", name="blocks.0.attn")
    with pytest.raises(QuantizationError, match="expected nn.Linear"):
        QuantizedLinear.from_linear(nn.Conv1d(4, 4, 1), "nf4")


def test_double_quant_layer_and_state_dict():
    lin = _linear(256, 256)
    plain = QuantizedLinear.from_linear(lin, "nf4")
    dq = QuantizedLinear.from_linear(lin, "nf4", double_quant=True)
    x = torch.randn(4, 256)
    torch.testing.assert_close(dq(x), plain(x), rtol=0.02, atol=0.02)
    sd = dq.state_dict()
    assert sd["scales"].dtype == torch.uint8
    nbytes_dq = sum(t.numel() * t.element_size() for t in sd.values())
    nbytes = sum(t.numel() * t.element_size() for t in plain.state_dict().values())
    assert nbytes_dq < nbytes
    fresh = QuantizedLinear(256, 256, "nf4", double_quant=True)
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), dq(x), rtol=0, atol=0)
    with pytest.raises(QuantizationError, match="double_quant=True"):
        QuantizedLinear(256, 256, "nf4").load_state_dict(sd)
    with pytest.raises(QuantizationError, match="double_quant applies to nf4 only"):
        QuantizedLinear(256, 256, "int8", double_quant=True)
