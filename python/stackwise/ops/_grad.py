"""First-order-only backward passes: the native backward ops have no derivative of their own.

A backward that runs with grad mode on (``create_graph=True``) while its inputs require grad
would otherwise hand back gradients whose own gradient is silently zero or ``None``. Here the
backward op runs without recording, and its results get a node that raises a clear error the
moment something differentiates through them (torch's ``once_differentiable`` mechanism, with a
message naming the op).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._C import _functions


def first_order_only(op: str, grads: tuple[Tensor | None, ...], *inputs: object) -> tuple:
    """Returns ``grads`` as they are, unless a second-order graph is being recorded (grad mode
    on and any of ``inputs`` requires grad): then each gradient is a copy whose backward raises
    ``RuntimeError`` naming ``op`` (``inputs``: what the gradients depend on)."""
    if not torch.is_grad_enabled():
        return grads
    tracked = [t for t in inputs if isinstance(t, Tensor) and t.requires_grad]
    present = [g for g in grads if g is not None]
    if not tracked or not present:
        return grads
    message = (
        f"{op}: second-order gradients are not implemented (its backward is a native op with no "
        "derivative of its own); for higher-order derivatives use the plain-PyTorch version in "
        "stackwise.ops.reference"
    )
    # The error node's edges lead to the tracked inputs, so any later gradient computation
    # that reaches them through these gradients runs it (and raises).
    err = _functions.DelayedError(message.encode(), len(present) + len(tracked))
    out = err(*[g.detach() for g in present], *tracked)
    out = out if isinstance(out, tuple) else (out,)
    it = iter(out)
    return tuple(next(it) if g is not None else None for g in grads)
