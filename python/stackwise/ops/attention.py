"""Scaled dot-product attention, FlashAttention-2 style (Dao 2023, "FlashAttention-2").

Native ops:

- ``torch.ops.stackwise.attention_forward(q, k, v, key_padding_mask, causal, scale)
  -> (out, lse)``
- ``torch.ops.stackwise.attention_backward(grad_out, q, k, v, out, lse, key_padding_mask,
  causal, scale) -> (grad_q, grad_k, grad_v)``

The forward visits keys block by block with an online softmax and saves only the per-row
log-sum-exp ``lse`` (float32, float64 for float64 inputs); the backward recomputes the
probabilities tile by tile from ``q``, ``k`` and ``lse``. Nothing of size S x S is ever stored,
and autograd keeps only ``q, k, v, out, lse``.

Fully masked query rows (every key padded) return zeros and zero gradients; their ``lse`` is
``+inf`` (FlashAttention's convention), so ``exp(s - lse)`` is exactly 0 in the backward.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stackwise.ops._grad import first_order_only

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Return ``softmax(scale * q k^T + masks) v`` per head.

    Args:
        q: ``[B, Hq, S, Dqk]``, float32/float64/float16/bfloat16, any strides (for example a
            transposed view of a ``[B, S, Hq, Dqk]`` projection; a unit last-dimension stride
            avoids a copy).
        k: ``[B, Hkv, S, Dqk]`` with ``Hq % Hkv == 0``: grouped-query (GQA) and multi-query (MQA)
            attention read kv head ``h // (Hq // Hkv)`` without repeating K/V.
        v: ``[B, Hkv, S, Dv]``; ``Dv`` may differ from ``Dqk`` (MLA uses 192/128).
        causal: query ``i`` attends keys ``j <= i``.
        key_padding_mask: optional ``[B, S]`` bool, True = attend to that key.
        scale: score scale, finite; default ``1 / sqrt(Dqk)`` (``Dqk >= 1``).

    Returns:
        ``[B, Hq, S, Dv]`` contiguous, in the input dtype (bf16/fp16 accumulate in float32).
        Rows whose keys are all masked are 0, with zero gradients. Differentiable in q, k, v.

    Raises:
        RuntimeError (ValueError/TypeError subclasses) naming the argument for wrong ranks,
        mismatched batch/sequence/head sizes, ``Hq % Hkv != 0``, a mask of the wrong shape or
        dtype, mixed devices, or a non-floating dtype.
    """
    out, _ = torch.ops.stackwise.attention_forward.default(q, k, v, key_padding_mask, causal, scale)
    return out


def _check_like_q(op: str, q: Tensor, name: str, t: Tensor) -> None:
    torch._check(
        t.device == q.device,
        lambda: (
            f"{op}: {name} is on {t.device} but q is on {q.device}; both must be on the same device"
        ),
    )
    torch._check(
        t.dtype == q.dtype,
        lambda: f"{op}: {name} has dtype {t.dtype} but q has dtype {q.dtype}; they must match",
    )


def _check_rank4(op: str, name: str, t: Tensor, dims: str) -> None:
    torch._check(
        t.dim() == 4, lambda: f"{op}: {name} must be 4-D {dims}, got shape {list(t.shape)}"
    )


def _check_dim(op: str, name: str, t: Tensor, dim: int, expected: int, what: str) -> None:
    torch._check(
        t.shape[dim] == expected,
        lambda: (
            f"{op}: {name} has {what} {t.shape[dim]} at dim {dim} but expected {expected} "
            f"(shape {list(t.shape)})"
        ),
    )


def _check_inputs(op: str, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    """The checks of cpp/ops/attention_checks.h, with the same messages, for fake tensors."""
    torch._check(
        q.dtype in _FLOAT_DTYPES,
        lambda: f"{op}: q must be float32, float64, float16 or bfloat16, got {q.dtype}",
    )
    _check_like_q(op, q, "k", k)
    _check_like_q(op, q, "v", v)
    _check_rank4(op, "q", q, "[B, Hq, S, Dqk]")
    _check_rank4(op, "k", k, "[B, Hkv, S, Dqk]")
    _check_rank4(op, "v", v, "[B, Hkv, S, Dv]")
    _check_dim(op, "k", k, 0, q.shape[0], "batch size")
    _check_dim(op, "v", v, 0, q.shape[0], "batch size")
    _check_dim(op, "k", k, 2, q.shape[2], "sequence length")
    _check_dim(op, "v", v, 2, q.shape[2], "sequence length")
    _check_dim(op, "k", k, 3, q.shape[3], "head dim")
    _check_dim(op, "v", v, 1, k.shape[1], "kv head count")
    torch._check_value(
        q.shape[3] > 0,
        lambda: f"{op}: q's head dim (Dqk, dim 3) must be >= 1, got shape {list(q.shape)}",
    )
    torch._check(
        k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0,
        lambda: (
            f"{op}: q has {q.shape[1]} heads, which must be a multiple of k's {k.shape[1]} heads "
            "(Hq % Hkv == 0)"
        ),
    )
    if mask is not None:
        torch._check(
            mask.device == q.device,
            lambda: (
                f"{op}: key_padding_mask is on {mask.device} but q is on {q.device}; "
                "both must be on the same device"
            ),
        )
        torch._check(
            mask.dtype == torch.bool,
            lambda: f"{op}: key_padding_mask must be bool (True = attend), got {mask.dtype}",
        )
        torch._check(
            mask.dim() == 2 and mask.shape[0] == q.shape[0] and mask.shape[1] == q.shape[2],
            lambda: (
                f"{op}: key_padding_mask must have shape [B, S] = [{q.shape[0]}, {q.shape[2]}], "
                f"got {list(mask.shape)}"
            ),
        )


def _check_scale(op: str, scale: float | None) -> None:
    torch._check_value(
        scale is None or math.isfinite(scale),
        lambda: f"{op}: scale must be a finite number (or None for 1/sqrt(Dqk)), got {scale}",
    )


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.register_fake("stackwise::attention_forward")
def _attention_forward_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float | None,
) -> tuple[Tensor, Tensor]:
    _check_inputs("attention_forward", q, k, v, key_padding_mask)
    _check_scale("attention_forward", scale)
    b, hq, s, _ = q.shape
    out = q.new_empty((b, hq, s, v.shape[3]))
    lse = q.new_empty((b, hq, s), dtype=_lse_dtype(q))
    return out, lse


@torch.library.register_fake("stackwise::attention_backward")
def _attention_backward_fake(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_inputs("attention_backward", q, k, v, key_padding_mask)
    _check_scale("attention_backward", scale)
    _check_like_q("attention_backward", q, "grad_out", grad_out)
    _check_like_q("attention_backward", q, "out", out)
    expected = [q.shape[0], q.shape[1], q.shape[2], v.shape[3]]
    torch._check(
        list(grad_out.shape) == expected,
        lambda: (
            f"attention_backward: grad_out has shape {list(grad_out.shape)} but expected {expected}"
        ),
    )
    torch._check(
        list(out.shape) == expected,
        lambda: f"attention_backward: out has shape {list(out.shape)} but expected {expected}",
    )
    torch._check(
        list(lse.shape) == expected[:3] and lse.dtype == _lse_dtype(q),
        lambda: (
            f"attention_backward: lse has shape {list(lse.shape)} and dtype {lse.dtype}, "
            f"expected {expected[:3]} and {_lse_dtype(q)}"
        ),
    )
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
    )


def _setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, v, key_padding_mask, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.causal = causal
    ctx.scale = scale


def _backward(ctx, grad_out: Tensor, grad_lse: Tensor | None) -> tuple:
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    with torch.no_grad():
        grad_q, grad_k, grad_v = torch.ops.stackwise.attention_backward.default(
            grad_out, q, k, v, out, lse, key_padding_mask, ctx.causal, ctx.scale
        )
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    grads = (
        grad_q if need_q else None,
        grad_k if need_k else None,
        grad_v if need_v else None,
        None,
        None,
        None,
    )
    return first_order_only("attention", grads, grad_out, q, k, v)


torch.library.register_autograd(
    "stackwise::attention_forward", _backward, setup_context=_setup_context
)
