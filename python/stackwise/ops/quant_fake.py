"""Fake (meta) kernels of the quantization ops, for torch.compile and meta tensors.

Each makes the checks the CPU/CUDA entry points make (``cpp/ops/quant_checks.h``,
``cpp/ops/quant_cpu.cpp``, ``cpp/ops/quantized_linear.cpp``), with the same messages, so that an
input the native op rejects also fails to trace instead of failing later at run time.
"""

from __future__ import annotations

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_INT64_MAX = 2**63 - 1


def _check_float(t: Tensor, op: str, arg: str) -> None:
    torch._check_type(
        t.dtype in _FLOATS,
        lambda: f"{op}: {arg} must be float32, float64, float16 or bfloat16, got {t.dtype}",
    )


def _check_nf4_block(block_size: int, op: str) -> None:
    torch._check_value(
        32 <= block_size <= 4096 and block_size & (block_size - 1) == 0,
        lambda: f"{op}: block_size must be a power of two from 32 to 4096, got {block_size}",
    )


def _same_device(t: Tensor, arg: str, ref: Tensor, ref_arg: str, op: str) -> None:
    torch._check(
        t.device == ref.device,
        lambda: f"{op}: {arg} is on {t.device} but {ref_arg} is on {ref.device}",
    )


def _numel(shape, op: str, what: str) -> int:
    n = 1
    for s in shape:
        torch._check_value(s >= 0, lambda: f"{op}: {what} has a negative size: {list(shape)}")
        n *= s
    torch._check_value(
        n <= _INT64_MAX,
        lambda: f"{op}: {what} {list(shape)} has more elements than fit in a 64-bit size",
    )
    return n


@torch.library.register_fake("stackwise::quantize_nf4")
def _quantize_nf4_fake(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    _check_float(x, "quantize_nf4", "x")
    _check_nf4_block(block_size, "quantize_nf4")
    n = x.numel()
    torch._check_value(
        n % block_size == 0,
        lambda: f"quantize_nf4: x has {n} elements, not a multiple of block_size {block_size}",
    )
    return (
        x.new_empty((n // 2,), dtype=torch.uint8),
        x.new_empty((n // block_size,), dtype=torch.float32),
    )


@torch.library.register_fake("stackwise::dequantize_nf4")
def _dequantize_nf4_fake(packed, absmax, shape, block_size, dtype):
    op = "dequantize_nf4"
    _check_nf4_block(block_size, op)
    torch._check_type(
        packed.dtype == torch.uint8, lambda: f"{op}: packed must be uint8, got {packed.dtype}"
    )
    torch._check_type(
        absmax.dtype == torch.float32, lambda: f"{op}: absmax must be float32, got {absmax.dtype}"
    )
    _same_device(absmax, "absmax", packed, "packed", op)
    torch._check_type(
        dtype in _FLOATS,
        lambda: f"{op}: dtype must be float32, float64, float16 or bfloat16, got {dtype}",
    )
    n = _numel(shape, op, "shape")
    torch._check_value(
        n % block_size == 0,
        lambda: (
            f"{op}: shape {list(shape)} has {n} elements, not a multiple of block_size {block_size}"
        ),
    )
    torch._check_value(
        packed.numel() == n // 2,
        lambda: f"{op}: packed has {packed.numel()} bytes but shape {list(shape)} needs {n // 2}",
    )
    torch._check_value(
        absmax.numel() == n // block_size,
        lambda: (
            f"{op}: absmax has {absmax.numel()} values but shape {list(shape)} with "
            f"block_size {block_size} needs {n // block_size}"
        ),
    )
    return packed.new_empty(list(shape), dtype=dtype)


def _check_rows_input(x: Tensor, op: str) -> None:
    _check_float(x, op, "x")
    torch._check_value(
        x.dim() == 2, lambda: f"{op}: x must be 2-D [rows, features], got shape {list(x.shape)}"
    )


@torch.library.register_fake("stackwise::quantize_int8")
def _quantize_int8_fake(x: Tensor) -> tuple[Tensor, Tensor]:
    _check_rows_input(x, "quantize_int8")
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.register_fake("stackwise::quantize_fp8")
def _quantize_fp8_fake(x: Tensor, fp8_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    _check_rows_input(x, "quantize_fp8")
    torch._check_type(
        fp8_dtype in _FP8,
        lambda: f"quantize_fp8: fp8_dtype must be float8_e4m3fn or float8_e5m2, got {fp8_dtype}",
    )
    return x.new_empty(x.shape, dtype=fp8_dtype), x.new_empty((x.shape[0],), dtype=torch.float32)


def _dequantize_rows_fake(q: Tensor, scale: Tensor, dtype: torch.dtype, op: str) -> Tensor:
    torch._check_value(
        q.dim() == 2, lambda: f"{op}: q must be 2-D [rows, features], got shape {list(q.shape)}"
    )
    torch._check_type(
        scale.dtype == torch.float32, lambda: f"{op}: scale must be float32, got {scale.dtype}"
    )
    torch._check_value(
        scale.dim() == 1 and scale.shape[0] == q.shape[0],
        lambda: f"{op}: scale must have shape [{q.shape[0]}], got {list(scale.shape)}",
    )
    _same_device(scale, "scale", q, "q", op)
    torch._check_type(
        dtype in _FLOATS,
        lambda: f"{op}: dtype must be float32, float64, float16 or bfloat16, got {dtype}",
    )
    return q.new_empty(q.shape, dtype=dtype)


@torch.library.register_fake("stackwise::dequantize_int8")
def _dequantize_int8_fake(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    torch._check_type(
        q.dtype == torch.int8, lambda: f"dequantize_int8: q must be int8, got {q.dtype}"
    )
    return _dequantize_rows_fake(q, scale, dtype, "dequantize_int8")


@torch.library.register_fake("stackwise::dequantize_fp8")
def _dequantize_fp8_fake(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    torch._check_type(
        q.dtype in _FP8,
        lambda: f"dequantize_fp8: q must be float8_e4m3fn or float8_e5m2, got {q.dtype}",
    )
    return _dequantize_rows_fake(q, scale, dtype, "dequantize_fp8")


def _check_qweight(x, qweight, scales, fmt, n, k, block, op) -> None:
    """make_qweight's checks (quantized_linear.cpp)."""
    torch._check_value(
        n > 0 and k > 0,
        lambda: f"{op}: out_features and in_features must be positive, got {n} and {k}",
    )
    torch._check(
        qweight.device == x.device and scales.device == x.device,
        lambda: (
            f"{op}: qweight ({qweight.device}) and scales ({scales.device}) must be on the "
            f"input's device {x.device}"
        ),
    )
    torch._check_type(
        scales.dtype == torch.float32, lambda: f"{op}: scales must be float32, got {scales.dtype}"
    )
    if fmt == "nf4":
        _check_nf4_block(block, op)
        nk = _numel((n, k), op, "out_features * in_features")
        torch._check_value(
            nk % block == 0,
            lambda: f"{op}: the weight's {nk} elements are not a multiple of block_size {block}",
        )
        torch._check_type(
            qweight.dtype == torch.uint8,
            lambda: f"{op}: nf4 qweight must be uint8, got {qweight.dtype}",
        )
        torch._check_value(
            qweight.numel() == nk // 2 and scales.numel() == nk // block,
            lambda: (
                f"{op}: nf4 qweight has {qweight.numel()} bytes and scales {scales.numel()} "
                f"values; a {n}x{k} weight with block_size {block} needs {nk // 2} and "
                f"{nk // block}"
            ),
        )
    elif fmt in ("int8", "fp8"):
        ok = qweight.dtype == torch.int8 if fmt == "int8" else qweight.dtype in _FP8
        torch._check_type(ok, lambda: f"{op}: {fmt} qweight has dtype {qweight.dtype}")
        torch._check_value(
            qweight.dim() == 2 and tuple(qweight.shape) == (n, k),
            lambda: f"{op}: qweight must have shape [{n}, {k}], got {list(qweight.shape)}",
        )
        torch._check_value(
            scales.numel() == n,
            lambda: f"{op}: scales must have {n} values, got {scales.numel()}",
        )
    else:
        torch._check_value(False, lambda: f"{op}: fmt must be 'nf4', 'int8' or 'fp8', got {fmt!r}")


@torch.library.register_fake("stackwise::quantized_linear")
def _quantized_linear_fake(x, qweight, scales, fmt, out_features, in_features, block_size, bias):
    op = "quantized_linear"
    _check_float(x, op, "x")
    torch._check_value(
        x.dim() >= 1 and x.shape[-1] == in_features,
        lambda: f"{op}: x must end in in_features={in_features}, got shape {list(x.shape)}",
    )
    _check_qweight(x, qweight, scales, fmt, out_features, in_features, block_size, op)
    if bias is not None:
        torch._check_value(
            bias.dim() == 1 and bias.shape[0] == out_features,
            lambda: f"{op}: bias must have shape [{out_features}], got {list(bias.shape)}",
        )
        torch._check_type(
            bias.dtype == x.dtype,
            lambda: f"{op}: bias has dtype {bias.dtype} but x has {x.dtype}",
        )
        _same_device(bias, "bias", x, "x", op)
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("stackwise::quantized_linear_backward")
def _quantized_linear_backward_fake(
    grad_out, qweight, scales, fmt, out_features, in_features, block_size
):
    op = "quantized_linear_backward"
    _check_float(grad_out, op, "grad_out")
    torch._check_value(
        grad_out.dim() >= 1 and grad_out.shape[-1] == out_features,
        lambda: (
            f"{op}: grad_out must end in out_features={out_features}, got shape "
            f"{list(grad_out.shape)}"
        ),
    )
    _check_qweight(grad_out, qweight, scales, fmt, out_features, in_features, block_size, op)
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))
