"""RMSNorm over the last dimension (Zhang & Sennrich 2019, "Root Mean Square Layer
Normalization"): ``y = x * rsqrt(mean(x**2, -1) + eps) * weight``.

Native ops: ``torch.ops.stackwise.rms_norm(x, weight, eps) -> (out, rstd)``, where ``rstd`` is
``1/sqrt(mean(x**2) + eps)`` per row (float32, float64 for float64 ``x``) kept for the backward,
and ``torch.ops.stackwise.rms_norm_backward(grad_out, x, weight, rstd) -> (grad_x, grad_weight)``.
The backward saves ``x``, ``weight`` and ``rstd`` only; ``grad_weight`` is summed over rows in a
fixed order (the same result run to run, whatever the thread count).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stackwise.ops._grad import first_order_only

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Return ``x * rsqrt(mean(x**2, dim=-1, keepdim=True) + eps) * weight``.

    Args:
        x: ``[..., D]`` (at least 1 dim, ``D >= 1``), float32/float64/float16/bfloat16, any
            strides.
        weight: ``[D]``, any of the same four float dtypes; it may differ from ``x``'s (for
            example float32 weights with bf16 activations). It is applied in ``x``'s
            accumulation type.
        eps: added to the mean square; finite and ``>= 0``.

    Returns:
        A new contiguous tensor of ``x``'s shape and dtype. The statistics and the products are
        computed in float32 (float64 for float64 ``x``) and rounded once. Differentiable in
        ``x`` and ``weight``; ``weight.grad`` has ``weight``'s dtype.

    Raises:
        RuntimeError (ValueError/TypeError subclasses) naming the argument for a wrong rank,
        a ``weight`` whose shape is not ``[D]``, unsupported dtypes, mixed devices or a bad
        ``eps``.
    """
    out, _ = torch.ops.stackwise.rms_norm.default(x, weight, eps)
    return out


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_inputs(op: str, x: Tensor, weight: Tensor) -> None:
    """The checks of rms_norm_cpu.cpp, for the fake kernels (meta tensors, torch.compile)."""
    torch._check_type(
        x.dtype in _FLOAT_DTYPES,
        lambda: f"{op}: x must be float32, float64, float16 or bfloat16, got {x.dtype}",
    )
    torch._check_value(
        x.dim() >= 1, lambda: f"{op}: x must have at least 1 dimension (features last)"
    )
    torch._check_value(
        x.shape[-1] > 0, lambda: f"{op}: x's last (feature) dimension must be non-empty"
    )
    torch._check_type(
        weight.dtype in _FLOAT_DTYPES,
        lambda: f"{op}: weight must be float32, float64, float16 or bfloat16, got {weight.dtype}",
    )
    torch._check(
        weight.device == x.device,
        lambda: (
            f"{op}: weight is on {weight.device} but x is on {x.device}; "
            "both must be on the same device"
        ),
    )
    torch._check_value(
        weight.dim() == 1 and weight.shape[0] == x.shape[-1],
        lambda: (
            f"{op}: weight must have shape [{x.shape[-1]}] (x's last dimension), "
            f"got {list(weight.shape)}"
        ),
    )


@torch.library.register_fake("stackwise::rms_norm")
def _rms_norm_fake(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    _check_inputs("rms_norm", x, weight)
    torch._check_value(
        math.isfinite(eps) and eps >= 0, lambda: f"rms_norm: eps must be finite and >= 0, got {eps}"
    )
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, x.new_empty(x.shape[:-1], dtype=_acc_dtype(x))


@torch.library.register_fake("stackwise::rms_norm_backward")
def _rms_norm_backward_fake(
    grad_out: Tensor, x: Tensor, weight: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor]:
    op = "rms_norm_backward"
    _check_inputs(op, x, weight)
    torch._check(
        grad_out.device == x.device,
        lambda: (
            f"{op}: grad_out is on {grad_out.device} but x is on {x.device}; "
            "both must be on the same device"
        ),
    )
    torch._check_type(
        grad_out.dtype == x.dtype,
        lambda: (
            f"{op}: grad_out has dtype {grad_out.dtype} but x has dtype {x.dtype}; they must match"
        ),
    )
    torch._check_value(
        grad_out.shape == x.shape,
        lambda: (
            f"{op}: grad_out has shape {list(grad_out.shape)} but x has shape "
            f"{list(x.shape)}; they must match"
        ),
    )
    torch._check(
        rstd.device == x.device,
        lambda: (
            f"{op}: rstd is on {rstd.device} but x is on {x.device}; "
            "both must be on the same device"
        ),
    )
    torch._check_type(
        rstd.dtype == _acc_dtype(x),
        lambda: (
            f"{op}: rstd must have dtype {_acc_dtype(x)} (x's accumulation type), got {rstd.dtype}"
        ),
    )
    torch._check_value(
        rstd.shape == x.shape[:-1],
        lambda: f"{op}: rstd must have shape {list(x.shape[:-1])}",
    )
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    return grad_x, weight.new_empty(weight.shape)


def _setup_context(ctx, inputs: tuple[Tensor, Tensor, float], output: tuple[Tensor, Tensor]):
    x, weight, _eps = inputs
    _out, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _backward(ctx, grad_out: Tensor, _grad_rstd: Tensor | None):
    x, weight, rstd = ctx.saved_tensors
    with torch.no_grad():
        grad_x, grad_weight = torch.ops.stackwise.rms_norm_backward.default(
            grad_out, x, weight, rstd
        )
    need_x, need_w, _ = ctx.needs_input_grad
    grads = (grad_x if need_x else None, grad_weight if need_w else None, None)
    return first_order_only("rms_norm", grads, grad_out, x, weight)


torch.library.register_autograd("stackwise::rms_norm", _backward, setup_context=_setup_context)
