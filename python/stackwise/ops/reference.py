"""Plain-PyTorch oracles for the native ops, used by the tests and benchmarks.

Each computes in float32 (float64 for float64 inputs) from the same inputs as the op and returns
the result in that accumulation type, so a test compares the op's rounded output against the
exact-as-possible value.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` in the accumulation dtype."""
    acc = _acc_dtype(gate)
    g = gate.to(acc)
    return g * torch.sigmoid(g) * up.to(acc)


def swiglu_backward_reference(grad_out: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """``(dL/dgate, dL/dup)`` of :func:`swiglu_reference` in the accumulation dtype."""
    acc = _acc_dtype(gate)
    g, u, dy = gate.to(acc), up.to(acc), grad_out.to(acc)
    s = torch.sigmoid(g)
    return dy * u * s * (1 + g * (1 - s)), dy * g * s


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """``x * rsqrt(mean(x**2, -1) + eps) * weight`` in the accumulation dtype."""
    acc = _acc_dtype(x)
    xf = x.to(acc)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(acc)


def rms_norm_backward_reference(
    grad_out: Tensor, x: Tensor, weight: Tensor, eps: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """``(dL/dx, dL/dweight)`` of :func:`rms_norm_reference` in the accumulation dtype."""
    acc = _acc_dtype(x)
    xf = x.detach().to(acc).requires_grad_(True)
    wf = weight.detach().to(acc).requires_grad_(True)
    out = rms_norm_reference(xf, wf, eps)
    grad_x, grad_w = torch.autograd.grad(out, (xf, wf), grad_out.to(acc))
    return grad_x, grad_w


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, offset: int) -> Tensor:
    acc = _acc_dtype(x)
    seq = x.shape[2]
    c = cos[offset : offset + seq].to(acc)
    s = sin[offset : offset + seq].to(acc)
    c, s = torch.cat([c, c], dim=-1), torch.cat([s, s], dim=-1)  # [S, rotary_dim]
    xr = x[..., :rotary_dim].to(acc)
    x1, x2 = xr.chunk(2, dim=-1)
    rotated = xr * c + torch.cat([-x2, x1], dim=-1) * s
    return torch.cat([rotated, x[..., rotary_dim:].to(acc)], dim=-1)


def rope_reference(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    rotary_dim: int | None = None,
    position_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """rotate_half RoPE of ``q`` and ``k`` (``[B, H, S, D]``) in the accumulation dtype."""
    r = q.shape[-1] if rotary_dim is None else rotary_dim
    return (
        _rotate(q, cos, sin, r, position_offset),
        _rotate(k, cos, sin, r, position_offset),
    )


def rope_backward_reference(
    grad_q: Tensor,
    grad_k: Tensor,
    cos: Tensor,
    sin: Tensor,
    rotary_dim: int | None = None,
    position_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`rope_reference`: the inverse rotation (``sin`` negated)."""
    return rope_reference(grad_q, grad_k, cos, -sin, rotary_dim, position_offset)
