"""Plain-PyTorch oracles for the native ops, used by the tests and benchmarks.

Each computes in float32 (float64 for float64 inputs) from the same inputs as the op and returns
the result in that accumulation type, so a test compares the op's rounded output against the
exact-as-possible value.
"""

from __future__ import annotations

import math

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


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Explicit ``softmax(scale * q k^T + masks) v`` with K/V repeated for GQA/MQA.

    Computed in ``compute_dtype`` (default: the accumulation dtype, float32 or float64) and
    returned in it. Rows whose keys are all masked are 0 (``F.scaled_dot_product_attention``
    returns NaN there). Differentiable, so ``torch.autograd.grad`` gives the reference gradients.
    """
    acc = compute_dtype or _acc_dtype(q)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        kf = kf.repeat_interleave(group, dim=1)
        vf = vf.repeat_interleave(group, dim=1)
    s_len = q.shape[2]
    sc = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * sc
    visible = torch.ones(s_len, s_len, dtype=torch.bool, device=q.device)
    if causal:
        visible = torch.tril(visible)
    visible = visible.expand(q.shape[0], 1, s_len, s_len)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    # Fully masked rows: softmax of all -inf is NaN; the convention is a zero row (with zero
    # gradients), so such rows get finite scores first and are zeroed after the softmax.
    empty_row = ~visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(empty_row, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(empty_row, 0.0)
    return torch.matmul(probs, vf)
