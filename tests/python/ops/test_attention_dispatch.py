"""The CUDA attention dispatch, without a GPU: the Python mirror agrees with the C++ table
(``cpp/include/stackwise/attention_dispatch.h``, whose function the C++ tests cover) and serves
the head dims the models use."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from stackwise.ops.attention_dispatch import (
    CUDA_HEAD_DIMS,
    cuda_head_dims_index,
    cuda_unsupported_reason,
)

ROOT = Path(__file__).resolve().parents[3]


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
