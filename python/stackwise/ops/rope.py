"""Rotary position embedding (Su et al. 2021, "RoFormer") of q and k, rotate_half pairing.

Pairing (GPT-NeoX / LLaMA "rotate_half"): within the first ``rotary_dim`` features of a head,
feature ``i`` pairs with feature ``i + rotary_dim // 2`` and the pair is rotated by the angle
``pos * theta ** (-2 i / rotary_dim)``::

    out[i]     = x[i] * cos[pos, i] - x[i + h] * sin[pos, i]
    out[i + h] = x[i + h] * cos[pos, i] + x[i] * sin[pos, i]       (h = rotary_dim // 2)

Features from ``rotary_dim`` on pass through unchanged (partial rotation, e.g. MLA's decoupled
key). Tables: ``cos``/``sin`` of shape ``[max_positions, rotary_dim // 2]``, float32, row ``p``
for position ``p`` (built and cached by :func:`rope_tables`). Token ``s`` uses row
``position_offset + s``.

Native ops: ``torch.ops.stackwise.rope(q, k, cos, sin, rotary_dim, position_offset)`` rotates q
and k in one pass; ``torch.ops.stackwise.rope_backward(grad_q, grad_k, ...)`` is the inverse
rotation (``sin`` negated). Nothing is saved for the backward but the tables.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from stackwise.ops._grad import first_order_only

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def rope(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    rotary_dim: int | None = None,
    position_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """Rotate ``q`` and ``k`` by their positions' angles (rotate_half pairing, module docstring).

    Args:
        q: ``[B, Hq, S, D]``, float32/float64/float16/bfloat16, any strides (a
            ``[B, S, H, D]`` projection transposed to ``[B, H, S, D]`` is read in place).
        k: ``[B, Hk, S, D]``, same dtype, device, ``B``, ``S`` and ``D`` as ``q``; ``Hk`` may
            differ from ``Hq`` (GQA/MQA).
        cos, sin: ``[max_positions, rotary_dim // 2]`` float32 on ``q``'s device, from
            :func:`rope_tables`. Not differentiated.
        rotary_dim: the number of leading features rotated, even, ``<= D``; default ``D``.
        position_offset: token ``s`` uses table row ``position_offset + s``;
            ``position_offset + S <= max_positions``.

    Returns:
        ``(q_out, k_out)``, new contiguous tensors of ``q``'s and ``k``'s shapes and dtype,
        computed in float32 (float64 for float64) and rounded once. Differentiable in ``q``
        and ``k``.

    Raises:
        RuntimeError (ValueError/TypeError subclasses) naming the argument for wrong ranks,
        mismatched shapes, dtypes or devices, an odd or too large ``rotary_dim``, tables of
        the wrong shape or dtype, or positions outside the table.
    """
    if rotary_dim is None:
        rotary_dim = q.shape[-1] if q.dim() > 0 else 0
    return torch.ops.stackwise.rope.default(q, k, cos, sin, rotary_dim, position_offset)


def rope_tables(
    max_positions: int,
    rotary_dim: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Return ``(cos, sin)`` tables for :func:`rope`, each ``[max_positions, rotary_dim // 2]``.

    Entry ``[p, i]`` is ``cos``/``sin`` of ``p * theta ** (-2 i / rotary_dim)``, computed in
    float64 and rounded to float32. Results are cached by argument (up to 32 entries): callers
    share the returned tensors and must not modify them in place.
    """
    if not isinstance(max_positions, int) or max_positions <= 0:
        raise ValueError(f"rope_tables: max_positions must be a positive int, got {max_positions}")
    if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rope_tables: rotary_dim must be a positive even int, got {rotary_dim}")
    if not theta > 0:
        raise ValueError(f"rope_tables: theta must be > 0, got {theta}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _cached_tables(max_positions, rotary_dim, float(theta), dev)


@functools.lru_cache(maxsize=32)
def _cached_tables(
    max_positions: int, rotary_dim: int, theta: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    inv_freq = theta**-exponent
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return (
        angles.cos().to(device=device, dtype=torch.float32),
        angles.sin().to(device=device, dtype=torch.float32),
    )


def _check_inputs(
    op: str,
    qn: str,
    q: Tensor,
    kn: str,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    rotary_dim: int,
    position_offset: int,
) -> None:
    """The checks of rope_cpu.cpp, for the fake kernels (meta tensors, torch.compile)."""
    torch._check_type(
        q.dtype in _FLOAT_DTYPES,
        lambda: f"{op}: {qn} must be float32, float64, float16 or bfloat16, got {q.dtype}",
    )
    torch._check_value(
        q.dim() == 4, lambda: f"{op}: {qn} must have shape [B, H, S, D] (4 dims), got {q.dim()}"
    )
    torch._check(
        k.device == q.device,
        lambda: (
            f"{op}: {kn} is on {k.device} but {qn} is on {q.device}; "
            "both must be on the same device"
        ),
    )
    torch._check_type(
        k.dtype == q.dtype,
        lambda: f"{op}: {kn} has dtype {k.dtype} but {qn} has dtype {q.dtype}; they must match",
    )
    torch._check_value(
        k.dim() == 4, lambda: f"{op}: {kn} must have shape [B, H, S, D] (4 dims), got {k.dim()}"
    )
    torch._check_value(
        k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2] and k.shape[3] == q.shape[3],
        lambda: (
            f"{op}: {kn} has shape {list(k.shape)} but {qn} has shape {list(q.shape)}; batch "
            "(dim 0), sequence (dim 2) and head size (dim 3) must match"
        ),
    )
    d = q.shape[3]
    torch._check_value(
        rotary_dim > 0 and rotary_dim % 2 == 0 and rotary_dim <= d,
        lambda: (
            f"{op}: rotary_dim must be even, positive and <= the head size {d}, got {rotary_dim}"
        ),
    )
    for name, t in (("cos", cos), ("sin", sin)):
        torch._check(
            t.device == q.device,
            lambda name=name, t=t: (
                f"{op}: {name} is on {t.device} but q is on {q.device}; "
                "both must be on the same device"
            ),
        )
        torch._check_type(
            t.dtype == torch.float32,
            lambda name=name, t=t: f"{op}: {name} must be float32, got {t.dtype}",
        )
        torch._check_value(
            t.dim() == 2 and t.shape[1] == rotary_dim // 2,
            lambda name=name, t=t: (
                f"{op}: {name} must have shape [max_positions, {rotary_dim // 2}], "
                f"got {list(t.shape)}"
            ),
        )
    torch._check_value(
        sin.shape == cos.shape,
        lambda: f"{op}: sin has shape {list(sin.shape)} but cos has shape {list(cos.shape)}",
    )
    torch._check_value(
        position_offset >= 0, lambda: f"{op}: position_offset must be >= 0, got {position_offset}"
    )
    torch._check_value(
        position_offset + q.shape[2] <= cos.shape[0],
        lambda: (
            f"{op}: position_offset ({position_offset}) + sequence length ({q.shape[2]}) "
            f"exceeds the table's max_positions ({cos.shape[0]})"
        ),
    )


@torch.library.register_fake("stackwise::rope")
def _rope_fake(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, position_offset: int
) -> tuple[Tensor, Tensor]:
    _check_inputs("rope", "q", q, "k", k, cos, sin, rotary_dim, position_offset)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
    )


@torch.library.register_fake("stackwise::rope_backward")
def _rope_backward_fake(
    grad_q: Tensor, grad_k: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int, position_offset: int
) -> tuple[Tensor, Tensor]:
    _check_inputs(
        "rope_backward", "grad_q", grad_q, "grad_k", grad_k, cos, sin, rotary_dim, position_offset
    )
    return (
        torch.empty_like(grad_q, memory_format=torch.contiguous_format),
        torch.empty_like(grad_k, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output) -> None:
    _q, _k, cos, sin, rotary_dim, position_offset = inputs
    ctx.save_for_backward(cos, sin)
    ctx.rotary_dim = rotary_dim
    ctx.position_offset = position_offset


def _backward(ctx, grad_q: Tensor, grad_k: Tensor):
    cos, sin = ctx.saved_tensors
    with torch.no_grad():
        gq, gk = torch.ops.stackwise.rope_backward.default(
            grad_q, grad_k, cos, sin, ctx.rotary_dim, ctx.position_offset
        )
    need_q, need_k = ctx.needs_input_grad[:2]
    grads = (gq if need_q else None, gk if need_k else None, None, None, None, None)
    # The rotation is linear in q and k: only a graph through the incoming gradients matters.
    return first_order_only("rope", grads, grad_q, grad_k)


torch.library.register_autograd("stackwise::rope", _backward, setup_context=_setup_context)
