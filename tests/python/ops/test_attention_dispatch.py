"""The CUDA attention dispatch, without a GPU: the Python mirror agrees with the C++ table
(``cpp/include/stackwise/attention_dispatch.h``, whose function the C++ tests cover), and every
shipped configuration's attention calls (shapes and dtype as they reach the op when the model
computes the way it would on a GPU) have a CUDA kernel: no ``NotImplementedError`` is reachable."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import stackwise.ops
from stackwise.config.base import StackWiseConfig
from stackwise.model.architecture import _layer_kwargs
from stackwise.model.mlgka import MLGKALayer
from stackwise.ops.attention_dispatch import (
    CUDA_HEAD_DIMS,
    cuda_head_dims_index,
    cuda_unsupported_reason,
)
from stackwise.run.plan import gpu_compute_dtype

ROOT = Path(__file__).resolve().parents[3]
# Every configuration file shipped in configs/ (any added later is picked up, none named here).
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*") if p.suffix in {".yaml", ".yml"})


def test_configs_are_found():
    assert len(CONFIGS) >= 3, CONFIGS


def test_mirror_matches_the_cpp_table():
    header = (ROOT / "cpp/include/stackwise/attention_dispatch.h").read_text()
    table = re.search(r"kCudaHeadDims\[\] = \{(.*?)\};", header, re.S).group(1)
    pairs = tuple((int(a), int(b)) for a, b in re.findall(r"\{(\d+), (\d+)\}", table))
    assert pairs == CUDA_HEAD_DIMS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_served(dtype):
    for d in (32, 64, 96, 128, 256):
        assert cuda_unsupported_reason(dtype, d, d) is None
    assert cuda_unsupported_reason(dtype, 192, 128) is None
    assert cuda_head_dims_index(48, 48) == -1
    assert "(256, 256)" in cuda_unsupported_reason(dtype, 48, 48)
    assert "bfloat16 or float16" in cuda_unsupported_reason(torch.float32, 64, 64)


def attention_calls(config) -> list[tuple[torch.dtype, int, int, int, int]]:
    """(dtype, Dqk, Dv, Hq, Hkv) of every softmax-attention call of one block of ``config``'s
    model, run on fake tensors under the autocast a GPU run of ``config`` would use."""
    calls = []
    original = stackwise.ops.attention

    def record(q, k, v, **kwargs):
        calls.append((q.dtype, q.shape[-1], v.shape[-1], q.shape[1], k.shape[1]))
        return original(q, k, v, **kwargs)

    dtype = gpu_compute_dtype(config.training)
    model = dataclasses.replace(config.model, max_seq_len=16)
    with torch.device("meta"):
        block = MLGKALayer(**_layer_kwargs(model))
    from stackwise.ops.rope import _cached_tables

    _cached_tables.cache_clear()
    stackwise.ops.attention = record
    try:
        with FakeTensorMode(), torch.device("cpu"):
            params = {
                n: torch.empty(t.shape, dtype=t.dtype)
                for n, t in [*block.named_parameters(), *block.named_buffers()]
            }
            x = torch.zeros(1, 16, model.d_model)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                torch.func.functional_call(block, params, (x,))
    finally:
        stackwise.ops.attention = original
        _cached_tables.cache_clear()
    return calls


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_has_a_cuda_attention_kernel(path):
    config = StackWiseConfig.from_yaml(path).validate()
    calls = attention_calls(config)
    if config.model.attention_type != "kernel":
        assert calls, "the block made no softmax-attention call"
    for dtype, dqk, dv, hq, hkv in calls:
        assert hq % hkv == 0
        assert cuda_unsupported_reason(dtype, dqk, dv) is None, (path.name, dtype, dqk, dv)


def test_auto_dtype_is_bf16_on_cuda_and_fp32_on_the_cpu():
    from stackwise.training.step import compute_dtype

    config = StackWiseConfig.from_yaml(ROOT / "configs" / "shakespeare-tiny.yaml").validate()
    assert config.training.dtype == "auto"
    assert compute_dtype(config.training, "cuda") is torch.bfloat16
    assert compute_dtype(config.training, "cpu") is None  # plain fp32
    assert gpu_compute_dtype(config.training) is torch.bfloat16
