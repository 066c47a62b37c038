"""Linear (kernel) attention (Katharopoulos et al. 2020, "Transformers are RNNs", eq. 4-6).

With feature maps ``q = phi(Q)`` and ``k = phi(K)`` of shape ``[B, H, S, M]`` and values
``v`` of shape ``[B, H, S, Dv]``::

    out[s] = q[s] @ (sum_t k[t]^T v[t]) / (q[s] . sum_t k[t] + eps)

with ``t`` over all positions, or ``t <= s`` when ``causal``. Cost is O(S * M * Dv) time and
O(M * Dv) state per head: no S x S matrix is formed (the causal form uses chunked prefix sums).

Native ops: ``torch.ops.stackwise.linear_attention(phi_q, phi_k, v, causal, eps) -> out`` and
``torch.ops.stackwise.linear_attention_backward(grad_out, phi_q, phi_k, v, causal, eps) ->
(grad_q, grad_k, grad_v)``, which recomputes numerators and normalisers in float32 from the inputs
(only the inputs are saved; bf16/fp16 gradients do not see the rounded output). The math of both
is in ``cpp/include/stackwise/linear_attention_math.h``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stackwise.ops._grad import first_order_only

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def linear_attention(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, *, causal: bool = False, eps: float = 1e-6
) -> Tensor:
    """Normalised linear attention over precomputed feature maps.

    Args:
        phi_q: ``[B, H, S, M]`` query features, float32/float64/float16/bfloat16, any strides.
        phi_k: ``[B, H, S, M]`` key features, same dtype and device as ``phi_q``.
        v: ``[B, H, S, Dv]`` values, same dtype and device.
        causal: attend only to positions ``t <= s``.
        eps: added to the normaliser ``phi_q[s] . sum_t phi_k[t]`` as is (finite, >= 0). With
            non-negative features the normaliser is then >= eps, and where it is ~0 every score is
            ~0 too, so the output row is ~0. Features that can be negative (random Fourier
            features) can drive it to 0 and the output is then unbounded.

    Returns:
        ``[B, H, S, Dv]``, contiguous, of ``v``'s dtype. bf16/fp16 accumulate in float32.
        Differentiable in ``phi_q``, ``phi_k`` and ``v``.

    Raises:
        RuntimeError (ValueError/TypeError subclasses) naming the argument for a wrong rank,
        mismatched ``B, H, S, M``, dtypes or devices, a non-floating dtype or a bad ``eps``.
    """
    return torch.ops.stackwise.linear_attention.default(phi_q, phi_k, v, causal, eps)


def _check_inputs(op: str, phi_q: Tensor, phi_k: Tensor, v: Tensor) -> None:
    torch._check_type(
        phi_q.dtype in _FLOAT_DTYPES,
        lambda: f"{op}: phi_q must be float32, float64, float16 or bfloat16, got {phi_q.dtype}",
    )
    torch._check_value(
        phi_q.dim() == 4,
        lambda: f"{op}: phi_q must be a 4-D tensor [B, H, S, M], got shape {list(phi_q.shape)}",
    )
    for name, t in (("phi_k", phi_k), ("v", v)):
        torch._check(
            t.device == phi_q.device,
            lambda name=name, t=t: (
                f"{op}: {name} is on {t.device} but phi_q is on {phi_q.device}; "
                "both must be on the same device"
            ),
        )
        torch._check_type(
            t.dtype == phi_q.dtype,
            lambda name=name, t=t: (
                f"{op}: {name} has dtype {t.dtype} but phi_q has dtype {phi_q.dtype}; "
                "they must match"
            ),
        )
    torch._check_value(
        phi_k.shape == phi_q.shape,
        lambda: (
            f"{op}: phi_k has shape {list(phi_k.shape)} but phi_q has shape "
            f"{list(phi_q.shape)}; they must match"
        ),
    )
    torch._check_value(
        v.dim() == 4,
        lambda: f"{op}: v must be a 4-D tensor [B, H, S, Dv], got shape {list(v.shape)}",
    )
    torch._check_value(
        v.shape[:3] == phi_q.shape[:3],
        lambda: (
            f"{op}: v has shape {list(v.shape)}; its [B, H, S] must match phi_q's shape "
            f"{list(phi_q.shape)}"
        ),
    )


def _check_eps(op: str, eps: float) -> None:
    torch._check_value(
        math.isfinite(eps) and eps >= 0.0,
        lambda: f"{op}: eps must be a finite number >= 0, got {eps}",
    )


@torch.library.register_fake("stackwise::linear_attention")
def _linear_attention_fake(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool = False, eps: float = 1e-6
) -> Tensor:
    _check_inputs("linear_attention", phi_q, phi_k, v)
    _check_eps("linear_attention", eps)
    return v.new_empty(v.shape)


@torch.library.register_fake("stackwise::linear_attention_backward")
def _linear_attention_backward_fake(
    grad_out: Tensor, phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    op = "linear_attention_backward"
    _check_inputs(op, phi_q, phi_k, v)
    torch._check(
        grad_out.device == v.device,
        lambda: (
            f"{op}: grad_out is on {grad_out.device} but v is on {v.device}; "
            "both must be on the same device"
        ),
    )
    torch._check_type(
        grad_out.dtype == v.dtype,
        lambda: (
            f"{op}: grad_out has dtype {grad_out.dtype} but v has dtype {v.dtype}; they must match"
        ),
    )
    torch._check_value(
        grad_out.shape == v.shape,
        lambda: (
            f"{op}: grad_out has shape {list(grad_out.shape)} but v has shape "
            f"{list(v.shape)}; they must match"
        ),
    )
    _check_eps(op, eps)
    return phi_q.new_empty(phi_q.shape), phi_k.new_empty(phi_k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    phi_q, phi_k, v, causal, eps = inputs
    ctx.save_for_backward(phi_q, phi_k, v)
    ctx.causal = causal
    ctx.eps = eps


def _backward(ctx, grad_out: Tensor) -> tuple:
    phi_q, phi_k, v = ctx.saved_tensors
    with torch.no_grad():
        grad_q, grad_k, grad_v = torch.ops.stackwise.linear_attention_backward.default(
            grad_out, phi_q, phi_k, v, ctx.causal, ctx.eps
        )
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    grads = (
        grad_q if need_q else None,
        grad_k if need_k else None,
        grad_v if need_v else None,
        None,
        None,
    )
    return first_order_only("linear_attention", grads, grad_out, phi_q, phi_k, v)


torch.library.register_autograd(
    "stackwise::linear_attention", _backward, setup_context=_setup_context
)
