"""SwiGLU, ``silu(gate) * up`` (Shazeer 2020, "GLU Variants Improve Transformer").

Native op: ``torch.ops.stackwise.swiglu(gate, up)`` with backward
``torch.ops.stackwise.swiglu_backward(grad_out, gate, up) -> (grad_gate, grad_up)``, which
recomputes ``sigmoid(gate)`` instead of saving intermediates: only the two inputs are kept for
the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stackwise.ops._grad import first_order_only

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """Return ``silu(gate) * up`` elementwise.

    Args:
        gate: any shape, float32/float64/float16/bfloat16, on CPU or CUDA; any strides.
        up: same shape, dtype and device as ``gate`` (no broadcasting).

    Returns:
        A new contiguous tensor of ``gate``'s shape and dtype. bf16/fp16 are computed in float32
        and rounded once. Differentiable in both inputs.

    Raises:
        RuntimeError (ValueError/TypeError subclasses) naming the argument when shapes, dtypes
        or devices differ or the dtype is not a supported floating type.
    """
    return torch.ops.stackwise.swiglu.default(gate, up)


def _check_like(op: str, gate: Tensor, name: str, other: Tensor) -> None:
    torch._check(
        gate.dtype in _FLOAT_DTYPES,
        lambda: f"{op}: gate must be float32, float64, float16 or bfloat16, got {gate.dtype}",
    )
    torch._check(
        other.dtype == gate.dtype,
        lambda: (
            f"{op}: {name} has dtype {other.dtype} but gate has dtype {gate.dtype}; they must match"
        ),
    )
    torch._check(
        other.shape == gate.shape,
        lambda: (
            f"{op}: {name} has shape {list(other.shape)} but gate has shape "
            f"{list(gate.shape)}; they must match"
        ),
    )
    torch._check(
        other.device == gate.device,
        lambda: (
            f"{op}: {name} is on {other.device} but gate is on {gate.device}; "
            "both must be on the same device"
        ),
    )


@torch.library.register_fake("stackwise::swiglu")
def _swiglu_fake(gate: Tensor, up: Tensor) -> Tensor:
    _check_like("swiglu", gate, "up", up)
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.register_fake("stackwise::swiglu_backward")
def _swiglu_backward_fake(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    _check_like("swiglu_backward", gate, "up", up)
    _check_like("swiglu_backward", gate, "grad_out", grad_out)
    return (
        torch.empty_like(gate, memory_format=torch.contiguous_format),
        torch.empty_like(up, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
    gate, up = inputs
    ctx.save_for_backward(gate, up)


def _backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None]:
    gate, up = ctx.saved_tensors
    with torch.no_grad():
        grad_gate, grad_up = torch.ops.stackwise.swiglu_backward.default(grad_out, gate, up)
    need_gate, need_up = ctx.needs_input_grad
    grads = (grad_gate if need_gate else None, grad_up if need_up else None)
    return first_order_only("swiglu", grads, grad_out, gate, up)


torch.library.register_autograd("stackwise::swiglu", _backward, setup_context=_setup_context)
