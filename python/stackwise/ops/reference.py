"""Plain-PyTorch oracles for the native ops, used by the tests and benchmarks.

Each computes in float32 (float64 for float64 inputs) from the same inputs as the op and returns
the result in that accumulation type, so a test compares the op's rounded output against the
exact-as-possible value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


# ---- quantization (formats in cpp/include/stackwise/quant_formats.h) -------------------

NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)


def quantize_nf4_reference(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """NF4 with plain tensor ops: absmax per block, multiply by the float32 reciprocal, clamp,
    count midpoints strictly below, pack two codes per byte (first in the high nibble)."""
    blocks = x.reshape(-1, block_size).float()
    absmax = blocks.abs().amax(dim=1)
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = (blocks * inv[:, None]).clamp(-1, 1).reshape(-1)
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    codes = (mids[None, :] < scaled[:, None]).sum(1).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def dequantize_nf4_reference(
    packed: Tensor, absmax: Tensor, shape, block_size: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()
    vals = NF4_CODE[codes].reshape(-1, block_size) * absmax[:, None]
    return vals.reshape(tuple(shape)).to(dtype)


def _rows(x: Tensor, axis):
    if axis is None:
        return x.reshape(1, -1).float(), [1] * x.dim(), None
    axis %= x.dim()
    shape = list(x.shape)
    shape[axis] = 1
    return x.movedim(axis, -1).reshape(-1, x.shape[axis]).float(), shape, axis


def _unrows(rows: Tensor, x: Tensor, axis):
    if axis is None:
        return rows.reshape(x.shape)
    return rows.reshape(list(x.movedim(axis, -1).shape)).movedim(-1, axis)


def quantize_int8_reference(x: Tensor, axis=-1) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 with round-half-even, scale = absmax / 127 (0 for zero rows)."""
    rows, shape, ax = _rows(x, axis)
    scale = rows.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale[:, None] > 0, torch.round(rows / safe[:, None]), torch.zeros_like(rows))
    q = q.clamp(-127, 127).to(torch.int8)
    return _unrows(q, x, ax), scale.reshape(shape)


def quantize_fp8_reference(x: Tensor, fmt: str = "e4m3", axis=-1) -> tuple[Tensor, Tensor]:
    """Scaled fp8: scale = absmax / max, codes = fp8(clamp(x / scale)) (0 for zero rows)."""
    fmax = {"e4m3": 448.0, "e5m2": 57344.0}[fmt]
    dtype = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
    rows, shape, ax = _rows(x, axis)
    scale = rows.abs().amax(dim=1) / fmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = torch.where(scale[:, None] > 0, rows / safe[:, None], torch.zeros_like(rows))
    q = v.clamp(-fmax, fmax).to(dtype)
    return _unrows(q, x, ax), scale.reshape(shape)


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


def linear_cross_entropy_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """``F.linear`` + ``F.cross_entropy`` (+ ``z_loss * logsumexp**2`` per labelled token) in the
    accumulation dtype, with the N x V logits in memory; a mean over no labelled token is 0."""
    acc = _acc_dtype(hidden)
    logits = F.linear(
        hidden.reshape(labels.numel(), hidden.shape[-1]).to(acc),
        weight.to(acc),
        None if bias is None else bias.to(acc),
    )
    y = labels.reshape(-1)
    losses = F.cross_entropy(
        logits, y, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    keep = y != ignore_index
    if z_loss:
        losses = losses + z_loss * torch.logsumexp(logits, -1).square() * keep
    if reduction == "none":
        return losses.reshape(labels.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / keep.sum().clamp_min(1)
