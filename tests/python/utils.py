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
    # Linear attention, forward and gradients: sums over S and M in another order than the S x S
    # oracle (fp32/fp64); one rounding of a float32 result (bf16/fp16), measured <= 3.8e-3 (bf16)
    # and <= 4.8e-4 (fp16) relative with a 1e-3 floor.
    ("linear_attention", torch.float64): (1e-10, 1e-12),
    ("linear_attention", torch.float32): (1e-4, 1e-5),
    ("linear_attention", torch.float16): (1e-3, 1e-5),
    ("linear_attention", torch.bfloat16): (8e-3, 1e-5),
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
