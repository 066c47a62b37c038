"""Quantization ops: NF4 (blockwise, bitsandbytes-compatible), int8 and fp8 (per row/axis, block
or tensor), fp16/bf16 casts with an overflow check, and ``quantized_linear``.

Formats are specified in ``cpp/include/stackwise/quant_formats.h``. Every failure to quantize
as asked raises :class:`stackwise.exceptions.QuantizationError` naming the argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from stackwise.exceptions import QuantizationError
from stackwise.ops import quant_fake  # noqa: F401  (registers the fake kernels)

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}


def _check_float(x: Tensor, name: str, op: str) -> None:
    if not isinstance(x, Tensor):
        raise QuantizationError(f"{op}: {name} must be a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise QuantizationError(
            f"{op}: {name} must be float32, float64, float16 or bfloat16, got {x.dtype}"
        )


def _check_block(block_size: int, op: str) -> None:
    if not (
        isinstance(block_size, int)
        and 32 <= block_size <= 4096
        and block_size & (block_size - 1) == 0
    ):
        raise QuantizationError(
            f"{op}: block_size must be a power of two from 32 to 4096, got {block_size!r}"
        )


def quantize_nf4(x: Tensor, block_size: int = 64) -> tuple[Tensor, Tensor]:
    """NF4-quantize ``x`` blockwise (QLoRA's NormalFloat4, bit-exact with bitsandbytes).

    Args:
        x: float tensor of any shape, ``x.numel()`` a multiple of ``block_size``; flattened in
            row-major order.
        block_size: elements per absmax block, a power of two from 32 to 4096.

    Returns:
        ``(packed, absmax)``: uint8 ``[numel / 2]`` (first element in the high nibble) and
        float32 ``[numel / block_size]``.
    """
    _check_float(x, "x", "quantize_nf4")
    _check_block(block_size, "quantize_nf4")
    if x.numel() % block_size:
        raise QuantizationError(
            f"quantize_nf4: x has {x.numel()} elements, not a multiple of block_size {block_size}"
        )
    return torch.ops.stackwise.quantize_nf4.default(x, block_size)


def dequantize_nf4(
    packed: Tensor,
    absmax: Tensor,
    shape: Sequence[int],
    block_size: int = 64,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Inverse of :func:`quantize_nf4`: ``code[q] * absmax`` in float32, cast to ``dtype``."""
    _check_block(block_size, "dequantize_nf4")
    if dtype not in _FLOATS:
        raise QuantizationError(f"dequantize_nf4: dtype must be a float dtype, got {dtype}")
    return torch.ops.stackwise.dequantize_nf4.default(
        packed, absmax, [int(s) for s in shape], block_size, dtype
    )


def dynamic_code_8bit() -> Tensor:
    """The signed 8-bit "dynamic" code book (Dettmers 2016, "8-Bit Approximations for
    Parallelism in Deep Learning"): per exponent e = 0..6, 2^e linearly spaced fraction values
    times 10^(e-6), both signs, plus 0 and 1 — the code bitsandbytes uses for the second level of
    QLoRA's double quantization. 256 float32 values, ascending; a code is an index into it."""
    data: list[float] = []
    for e in range(7):
        items = 2**e + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + e)) * means).tolist()
        data += (-(10 ** (-6 + e)) * means).tolist()
    data += [0.0, 1.0]  # 254 + 2 = 256 values
    return torch.tensor(data, dtype=torch.float32).sort().values


def double_quantize_absmax(absmax: Tensor, block_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """QLoRA's double quantization of NF4 absmax values: subtract their mean, then quantize to the
    8-bit dynamic code in blocks of ``block_size`` with a float32 absmax each (nearest code, ties
    to the lower value).

    Returns ``(codes uint8 [n], scales float32 [ceil(n / block_size)], offset float32 [])``.
    Costs 8 + 32 / block_size bits per absmax instead of 32.
    """
    if absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise QuantizationError(
            f"double_quantize_absmax: absmax must be 1-D float32, got {absmax.dtype} "
            f"of shape {tuple(absmax.shape)}"
        )
    code = dynamic_code_8bit().to(absmax.device)
    offset = absmax.mean()
    a = absmax - offset
    n = a.numel()
    pad = (-n) % block_size
    blocks = torch.nn.functional.pad(a, (0, pad)).reshape(-1, block_size)
    scales = blocks.abs().amax(dim=1)
    norm = (blocks / scales.clamp(min=1e-38)[:, None]).clamp(-1, 1).reshape(-1)[:n]
    sorted_code, order = code.sort()
    mids = (sorted_code[:-1] + sorted_code[1:]) / 2
    codes = order[torch.bucketize(norm, mids)].to(torch.uint8)
    return codes, scales, offset


def double_dequantize_absmax(
    codes: Tensor, scales: Tensor, offset: Tensor, block_size: int = 256
) -> Tensor:
    """Inverse of :func:`double_quantize_absmax`: ``code[c] * scale + offset`` (float32)."""
    code = dynamic_code_8bit().to(codes.device)
    n = codes.numel()
    vals = code[codes.long()]
    pad = (-n) % block_size
    vals = torch.nn.functional.pad(vals, (0, pad)).reshape(-1, block_size) * scales[:, None]
    return vals.reshape(-1)[:n] + offset


def _rows_view(x: Tensor, axis: int | None, block_size: int | None, op: str) -> tuple[Tensor, list]:
    """Map per-axis / per-block / per-tensor scaling onto rows of a 2-D view.

    Returns the 2-D view and the shape the per-row scale must take to broadcast against x.
    """
    if block_size is not None:
        if not isinstance(block_size, int) or block_size <= 0 or x.numel() % block_size:
            raise QuantizationError(
                f"{op}: x has {x.numel()} elements, not a multiple of block_size {block_size!r}"
            )
        return x.reshape(-1, block_size), [x.numel() // block_size]
    if axis is None:
        return x.reshape(1, -1), [1] * x.dim()
    if x.dim() == 0:
        raise QuantizationError(f"{op}: x is a 0-d tensor; use axis=None")
    if not -x.dim() <= axis < x.dim():
        raise QuantizationError(f"{op}: axis {axis} is out of range for a {x.dim()}-d tensor")
    axis %= x.dim()
    moved = x.movedim(axis, -1)
    scale_shape = list(x.shape)
    scale_shape[axis] = 1
    return moved.reshape(-1, x.shape[axis]), scale_shape


def _scale_rows(q: Tensor, scale: Tensor, op: str) -> tuple[Tensor, Tensor, int | None]:
    """The inverse mapping: a 2-D view of q and the row scales, plus the axis (None if blocks)."""
    if scale.dim() == 0:  # per tensor, from axis=None on a 0-d x
        return q.reshape(1, -1), scale.reshape(1).float(), None
    if q.dim() == 1 and scale.dim() == 1 and scale.numel() > 0 and q.numel() % scale.numel() == 0:
        # a 1-D x: one scale (axis=-1 or None) or one per block of block_size elements
        return q.reshape(scale.numel(), -1), scale.float(), None
    if scale.dim() == q.dim() and scale.dim() > 0:
        diff = [d for d in range(q.dim()) if scale.shape[d] != q.shape[d]]
        if len(diff) > 1 or any(scale.shape[d] != 1 for d in diff):
            if scale.numel() == 1:  # per-tensor
                return q.reshape(1, -1), scale.reshape(1).float(), None
            raise QuantizationError(
                f"{op}: scale of shape {tuple(scale.shape)} does not match q {tuple(q.shape)}"
            )
        ones = [d for d in range(q.dim()) if scale.shape[d] == 1]
        axis = diff[0] if diff else (ones[-1] if ones else q.dim() - 1)
        rows = q.movedim(axis, -1).reshape(-1, q.shape[axis])
        return rows, scale.movedim(axis, -1).reshape(-1).float(), axis
    if scale.dim() == 1 and scale.numel() > 0 and q.numel() % scale.numel() == 0:
        return q.reshape(scale.numel(), -1), scale.float(), None
    raise QuantizationError(
        f"{op}: scale of shape {tuple(scale.shape)} does not fit q of shape {tuple(q.shape)}"
    )


def _from_rows(rows: Tensor, q: Tensor, axis: int | None) -> Tensor:
    if axis is None:
        return rows.reshape(q.shape)
    moved_shape = list(q.movedim(axis, -1).shape)
    return rows.reshape(moved_shape).movedim(-1, axis)


def quantize_int8(
    x: Tensor, axis: int | None = -1, block_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8: ``q = round(x / scale)``, ``scale = absmax / 127``.

    Scales are per slice along ``axis`` (default the last: one per output row of a weight), per
    flat block of ``block_size`` elements when given, or per tensor with ``axis=None``.

    Returns:
        ``(q, scale)``: int8 of x's shape; float32 scale broadcastable against q (the reduced
        axis kept with size 1), or ``[numel / block_size]`` for blocks.
    """
    _check_float(x, "x", "quantize_int8")
    rows, scale_shape = _rows_view(x, axis, block_size, "quantize_int8")
    q, scale = torch.ops.stackwise.quantize_int8.default(rows)
    axis_n = None if (block_size is not None or axis is None) else axis % x.dim()
    return _from_rows(q, x, axis_n), scale.reshape(scale_shape)


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale`` in float32, cast to ``dtype`` (inverse of :func:`quantize_int8`)."""
    if q.dtype != torch.int8:
        raise QuantizationError(f"dequantize_int8: q must be int8, got {q.dtype}")
    rows, srows, axis = _scale_rows(q, scale, "dequantize_int8")
    out = torch.ops.stackwise.dequantize_int8.default(rows, srows, dtype)
    return _from_rows(out, q, axis)


def quantize_fp8(x: Tensor, fmt: str = "e4m3", axis: int | None = -1) -> tuple[Tensor, Tensor]:
    """Scaled fp8: ``q = fp8(x / scale)``, ``scale = absmax / max(fmt)`` per slice along ``axis``
    (or per tensor with ``axis=None``); ``fmt`` is ``"e4m3"`` (max 448) or ``"e5m2"`` (57344).

    Returns ``(q, scale)``: torch.float8_e4m3fn / float8_e5m2 of x's shape, float32 scale
    broadcastable against q.
    """
    _check_float(x, "x", "quantize_fp8")
    if fmt not in FP8_FORMATS:
        raise QuantizationError(f"quantize_fp8: fmt must be 'e4m3' or 'e5m2', got {fmt!r}")
    rows, scale_shape = _rows_view(x, axis, None, "quantize_fp8")
    q, scale = torch.ops.stackwise.quantize_fp8.default(rows, FP8_FORMATS[fmt])
    axis_n = None if axis is None else axis % x.dim()
    return _from_rows(q, x, axis_n), scale.reshape(scale_shape)


def dequantize_fp8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale`` in float32, cast to ``dtype`` (inverse of :func:`quantize_fp8`)."""
    if q.dtype not in FP8_FORMATS.values():
        raise QuantizationError(f"dequantize_fp8: q must be an fp8 tensor, got {q.dtype}")
    rows, srows, axis = _scale_rows(q, scale, "dequantize_fp8")
    out = torch.ops.stackwise.dequantize_fp8.default(rows, srows, dtype)
    return _from_rows(out, q, axis)


def to_half(x: Tensor, dtype: torch.dtype = torch.float16, name: str = "tensor") -> Tensor:
    """Cast to fp16 or bf16, refusing a cast that turns finite values into inf (fp16 overflows
    above 65504)."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise QuantizationError(f"to_half: dtype must be float16 or bfloat16, got {dtype}")
    _check_float(x, name, "to_half")
    y = x.to(dtype)
    if dtype == torch.float16 and not bool(torch.isfinite(y).all()):
        finite_before = torch.isfinite(x)
        overflow = finite_before & ~torch.isfinite(y)
        if bool(overflow.any()):
            worst = float(x[overflow].abs().max())
            raise QuantizationError(
                f"to_half: {name} has {int(overflow.sum())} values that overflow float16 "
                f"(largest |x| = {worst:.4g} > 65504)"
            )
    return y


def quantized_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    fmt: str,
    out_features: int,
    in_features: int,
    block_size: int = 64,
    bias: Tensor | None = None,
) -> Tensor:
    """``y = x · dequant(W)ᵀ + bias`` for a frozen weight ``W [out_features, in_features]``.

    ``fmt`` is ``"nf4"`` (qweight uint8 ``[N*K/2]``, scales ``[N*K/block_size]``), ``"int8"``
    or ``"fp8"`` (qweight ``[N, K]``, scales ``[N]`` or ``[N, 1]``). Differentiable in ``x`` and
    ``bias``; the weight gets no gradient and is dequantized tile by tile into one reused
    buffer, never whole.
    """
    _check_float(x, "x", "quantized_linear")
    return torch.ops.stackwise.quantized_linear.default(
        x, qweight, scales, fmt, out_features, in_features, block_size, bias
    )


# ---- autograd ------------------------------------------------------------


def _ql_setup_context(ctx, inputs, output) -> None:
    x, qweight, scales, fmt, out_features, in_features, block_size, bias = inputs
    ctx.save_for_backward(qweight, scales)
    ctx.meta = (fmt, out_features, in_features, block_size)
    ctx.has_bias = bias is not None


def _ql_backward(ctx, grad_out: Tensor):
    qweight, scales = ctx.saved_tensors
    fmt, out_features, in_features, block_size = ctx.meta
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.stackwise.quantized_linear_backward.default(
            grad_out, qweight, scales, fmt, out_features, in_features, block_size
        )
    grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[7]:
        grad_bias = grad_out.reshape(-1, out_features).sum(0)
    return grad_x, None, None, None, None, None, None, grad_bias


torch.library.register_autograd(
    "stackwise::quantized_linear", _ql_backward, setup_context=_ql_setup_context
)
