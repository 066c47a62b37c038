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
