"""Python entry points of the native ops (``torch.ops.stackwise.*``).

Each family's module holds the typed wrapper, the fake (meta) kernel for torch.compile and the
autograd registration whose backward calls the family's backward op. Plain-PyTorch oracles are in
:mod:`stackwise.ops.reference`.
"""

from __future__ import annotations

from stackwise.ops.attention import attention
from stackwise.ops.linear_attention import linear_attention
from stackwise.ops.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_with_predictions,
)
from stackwise.ops.quant import (
    dequantize_fp8,
    dequantize_int8,
    dequantize_nf4,
    double_dequantize_absmax,
    double_quantize_absmax,
    quantize_fp8,
    quantize_int8,
    quantize_nf4,
    quantized_linear,
    to_half,
)
from stackwise.ops.rms_norm import rms_norm
from stackwise.ops.rope import rope, rope_tables
from stackwise.ops.swiglu import swiglu

__all__ = [
    "attention",
    "dequantize_fp8",
    "dequantize_int8",
    "dequantize_nf4",
    "double_dequantize_absmax",
    "double_quantize_absmax",
    "linear_attention",
    "linear_cross_entropy",
    "linear_cross_entropy_with_predictions",
    "quantize_fp8",
    "quantize_int8",
    "quantize_nf4",
    "quantized_linear",
    "rms_norm",
    "rope",
    "rope_tables",
    "swiglu",
    "to_half",
]
