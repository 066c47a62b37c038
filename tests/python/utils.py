"""Shared test helpers: the one tolerance table (DESIGN.md §5) and device parametrization.

Tolerances compare an op's output, upcast to float32/float64, with the oracle in
stackwise.ops.reference computed in the accumulation dtype. For a result rounded once to the
storage dtype the error is half an ulp: 2^-11 relative for fp16, 2^-8 for bf16; the table allows
about twice that.
"""

from __future__ import annotations

import pytest
import torch

# (op kind, dtype) -> (rtol, atol)
TOLERANCES: dict[tuple[str, torch.dtype], tuple[float, float]] = {
    ("elementwise", torch.float64): (1e-12, 1e-14),
    ("elementwise", torch.float32): (1e-5, 1e-6),
    ("elementwise", torch.float16): (1e-3, 1e-5),
    ("elementwise", torch.bfloat16): (8e-3, 1e-5),
    # Attention sums S products per output (and S*S for dK/dV); the fp32 kernels use exp_u20
    # (~2e-6 relative) and a different summation order than the oracle. bf16/fp16 also round
    # the probability tile P (and dS) to the storage dtype before the P V product, as
    # FlashAttention does; their main check is FlashAttention's 2x-of-low-precision-reference
    # rule (tests/python/ops/test_attention.py), this entry bounds the absolute drift.
    ("attention", torch.float64): (1e-9, 1e-11),
    ("attention", torch.float32): (1e-4, 2e-5),
    ("attention", torch.float16): (1e-2, 5e-3),
    ("attention", torch.bfloat16): (5e-2, 3e-2),
}

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

HAS_CUDA = torch.cuda.is_available()
CUDA_SKIP_REASON = "no CUDA device visible (CUDA tests run under `make gpu-test`)"

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)]
    ),
]


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, kind: str, dtype: torch.dtype
) -> None:
    """Compare ``actual`` (storage dtype) with ``expected`` (accumulation dtype) per the table."""
    rtol, atol = TOLERANCES[(kind, dtype)]
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol)
