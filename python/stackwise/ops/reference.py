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


def linear_attention_reference(
    phi_q: Tensor, phi_k: Tensor, v: Tensor, *, causal: bool = False, eps: float = 1e-6
) -> Tensor:
    """Linear attention in the explicit S x S form (Katharopoulos et al. 2020, eq. 4).

    ``scores = phi_q @ phi_k^T`` (lower-triangular when ``causal``),
    ``out = scores @ v / (scores.sum(-1) + eps)``. Quadratic in S on purpose: it shares no
    arithmetic with the kernel's chunked prefix sums, so it cross-checks them.
    """
    acc = _acc_dtype(phi_q)
    q, k, vv = phi_q.to(acc), phi_k.to(acc), v.to(acc)
    scores = q @ k.transpose(-1, -2)
    if causal:
        scores = torch.tril(scores)
    return (scores @ vv) / (scores.sum(-1, keepdim=True) + eps)
