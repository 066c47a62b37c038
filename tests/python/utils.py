"""Shared test helpers: the one tolerance table (docs/DESIGN.md §5) and device parametrization.

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
    # Results that sum over a dimension (rms_norm's backward: grad_weight over rows, grad_x's
    # row dot product). The kernel and the oracle add in different orders, so a sum of n terms
    # of size ~1 may differ by ~n * 2^-24 in float32; a sum that cancels to near zero makes
    # that an absolute error, hence the atol. bf16/fp16 still round the result once.
    ("reduction", torch.float64): (1e-10, 1e-10),
    ("reduction", torch.float32): (1e-4, 1e-4),
    ("reduction", torch.float16): (2e-3, 1e-3),
    ("reduction", torch.bfloat16): (1.6e-2, 1e-2),
    # Linear attention, forward and gradients: sums over S and M in another order than the S x S
    # oracle (fp32/fp64); one rounding of a float32 result (bf16/fp16), measured <= 3.8e-3 (bf16)
    # and <= 4.8e-4 (fp16) relative with a 1e-3 floor.
    ("linear_attention", torch.float64): (1e-10, 1e-12),
    ("linear_attention", torch.float32): (1e-4, 1e-5),
    ("linear_attention", torch.float16): (1e-3, 1e-5),
    ("linear_attention", torch.bfloat16): (8e-3, 1e-5),
    # Attention sums S products per output (and S*S for dK/dV); the fp32 kernels use exp_u20
    # (~2e-6 relative) and a different summation order than the oracle. bf16/fp16 also round
    # the probability tile P (and dS) to the storage dtype before the P V product, as
    # FlashAttention does; their main check is FlashAttention's 2x-of-low-precision-reference
    # rule (tests/python/ops/test_attention.py), this entry bounds the absolute drift.
    ("attention", torch.float64): (1e-9, 1e-11),
    ("attention", torch.float32): (1e-4, 2e-5),
    ("attention", torch.float16): (1e-2, 5e-3),
    ("attention", torch.bfloat16): (5e-2, 3e-2),
    # Linear cross-entropy: losses and gradients against F.linear + F.cross_entropy on the
    # upcast inputs. float32 uses exp_u20 (~2.4e-6 relative) and sums V terms in another order;
    # bf16/fp16 gradients are rounded once to the storage dtype (losses stay float32).
    ("linear_cross_entropy", torch.float64): (1e-10, 1e-12),
    ("linear_cross_entropy", torch.float32): (1e-4, 1e-6),
    ("linear_cross_entropy", torch.float16): (2e-3, 1e-6),
    ("linear_cross_entropy", torch.bfloat16): (1.6e-2, 1e-5),
    # Whole-model logits of an imported/exported Llama against transformers' own forward: the
    # same weights through other kernels (native RMSNorm, RoPE, attention, SwiGLU) summing in
    # other orders, over a few layers; measured <= 4e-7 absolute on logits of size ~1.
    ("model_logits", torch.float32): (1e-4, 1e-5),
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


def has_cuda_kernel(op: str) -> bool:
    """Whether ``stackwise::<op>`` has a CUDA kernel in this build (import stackwise first)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"stackwise::{op}", "CUDA")


def devices_for(op: str) -> list:
    """Like DEVICES, but the CUDA cases also skip while ``op`` has no CUDA kernel, so a family
    whose CPU kernel lands first still passes `make gpu-test`."""
    import stackwise  # noqa: F401  (loads the registrations)

    reason = f"stackwise::{op} has no CUDA kernel in this build yet"
    return [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON),
                pytest.mark.skipif(HAS_CUDA and not has_cuda_kernel(op), reason=reason),
            ],
        ),
    ]


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, kind: str, dtype: torch.dtype
) -> None:
    """Compare ``actual`` (storage dtype) with ``expected`` (accumulation dtype) per the table."""
    rtol, atol = TOLERANCES[(kind, dtype)]
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol)


def tiny_model(vocab_size: int, **overrides) -> dict:
    """The ``model`` section of the small racks the training, generation and resume tests
    build: d_model 32, 4 heads, d_ff 64, two stacks of two blocks, max_seq_len 32; ``overrides``
    replace or add keys."""
    return {
        "vocab_size": vocab_size,
        "d_model": 32,
        "n_heads": 4,
        "n_kv_heads": 4,
        "d_ff": 64,
        "n_layers": 4,
        "max_seq_len": 32,
        "architecture": {"n_stacks": 2, "blocks_per_stack": 2},
        **overrides,
    }
