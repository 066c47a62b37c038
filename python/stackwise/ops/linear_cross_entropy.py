"""Linear cross-entropy: the LM head and its loss in one op, without N x V logits.

``loss = cross_entropy(hidden @ weight.T + bias, labels)`` with ``ignore_index``, label smoothing
(PyTorch's definition: target ``(1 - eps) onehot + eps / V``) and a z-loss ``z_loss * lse**2``
per token (PaLM), computed chunk by chunk over the tokens: one logits buffer of a few hundred
rows exists at a time, in float32 (float64 for float64 inputs) whatever the input dtype.

Native ops (``cpp/ops/linear_cross_entropy*.cpp``, ``cuda/linear_cross_entropy.cu``):

- ``linear_cross_entropy_forward(hidden, weight, bias, labels, ...) -> (losses [N], predictions
  [N])``: per-token losses (0 where ignored) and each row's argmax; its autograd backward is
  ``linear_cross_entropy_backward``, which recomputes the logits per chunk (reduction
  ``"none"``, and whenever the gradient is not known in the forward).
- ``linear_cross_entropy_fused(..., reduction)``: a mean or sum loss whose gradients are computed
  in the same pass over the chunks (as Liger-Kernel does): 3 GEMMs per chunk instead of the 4 a
  recomputing backward needs, and no logits kept for the backward, which only scales the stored
  gradients by the incoming one. The wrapper takes this path when a mean/sum loss is
  differentiated.

A mean over a batch in which every label is ``ignore_index`` is defined as 0 with zero
gradients (``F.cross_entropy`` gives NaN): a fully masked micro-batch then neither poisons a run
nor needs a device sync to detect.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stackwise.ops._grad import first_order_only

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(
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
    """Cross entropy of ``hidden @ weight.T + bias`` against ``labels``, never holding the
    ``N x V`` logits.

    Args:
        hidden: ``[..., d]`` float32/float64/float16/bfloat16 (``N`` = the product of the
            leading dims), on CPU or CUDA; any strides.
        weight: ``[V, d]`` of ``hidden``'s dtype and device (a tied head passes the embedding
            table: its gradient lands there).
        labels: int64 of ``hidden``'s leading shape, each in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` of ``hidden``'s dtype.
        ignore_index: label value that carries no loss.
        label_smoothing: ``eps`` in ``[0, 1]``.
        z_loss: weight of ``lse**2`` per token (``>= 0``; 0 disables it).
        reduction: ``"mean"`` (over tokens with a label; 0 when there is none), ``"sum"`` or
            ``"none"`` (per-token losses of ``labels``' shape, 0 at ignored positions).

    Returns:
        float32 (float64 for float64 inputs) loss. Differentiable in ``hidden``, ``weight`` and
        ``bias`` (first order).

    Raises:
        RuntimeError (ValueError/TypeError subclasses) naming the argument: shapes, dtypes,
        devices, a label outside ``[0, V)``, a bad option.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"linear_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}"
        )
    if hidden.dim() < 1:
        raise ValueError("linear_cross_entropy: hidden must be [..., d], got a 0-dim tensor")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"linear_cross_entropy: labels has shape {list(labels.shape)} but hidden's leading "
            f"shape is {list(hidden.shape[:-1])}; they must match"
        )
    h = hidden.reshape(labels.numel(), hidden.shape[-1])
    y = labels.reshape(-1)
    params = (int(ignore_index), float(label_smoothing), float(z_loss))
    grad_wanted = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if reduction != "none" and grad_wanted:
        weight_grad = weight.requires_grad or (bias is not None and bias.requires_grad)
        loss, _, _, _ = torch.ops.stackwise.linear_cross_entropy_fused.default(
            h, weight, bias, y, *params, reduction, weight_grad
        )
        return loss
    losses, _ = torch.ops.stackwise.linear_cross_entropy_forward.default(
        h, weight, bias, y, *params
    )
    if reduction == "none":
        return losses.reshape(labels.shape)
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / (y != ignore_index).sum().clamp_min(1).to(total.dtype)


def linear_cross_entropy_with_predictions(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Per-token losses (as ``reduction="none"``) and the argmax of each token's logits (the
    first index of the maximum, as ``torch.argmax``), both of ``labels``' shape: what an
    evaluation needs for loss and accuracy in one pass."""
    losses, preds = torch.ops.stackwise.linear_cross_entropy_forward.default(
        hidden.reshape(labels.numel(), hidden.shape[-1]),
        weight,
        bias,
        labels.reshape(-1),
        int(ignore_index),
        float(label_smoothing),
        float(z_loss),
    )
    return losses.reshape(labels.shape), preds.reshape(labels.shape)


# -- fake kernels (torch.compile, meta tensors) ------------------------------------------------


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check(
    op: str,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    label_smoothing: float,
    z_loss: float,
) -> None:
    """The shape/dtype/device/option checks of linear_cross_entropy.cpp (not the label range,
    which needs the values)."""
    torch._check_type(
        hidden.dtype in _FLOAT_DTYPES,
        lambda: f"{op}: hidden must be float32, float64, float16 or bfloat16, got {hidden.dtype}",
    )
    torch._check_value(
        hidden.dim() == 2, lambda: f"{op}: hidden must be [N, d] (2-D), got {list(hidden.shape)}"
    )
    torch._check_type(
        weight.dtype == hidden.dtype,
        lambda: f"{op}: weight has dtype {weight.dtype} but hidden has dtype {hidden.dtype}",
    )
    torch._check_value(
        weight.dim() == 2 and weight.shape[1] == hidden.shape[1],
        lambda: f"{op}: weight must be [V, d] with d = {hidden.shape[1]}, got {list(weight.shape)}",
    )
    torch._check_value(weight.shape[0] > 0, lambda: f"{op}: weight has no rows (vocabulary of 0)")
    torch._check(weight.device == hidden.device, lambda: f"{op}: weight is on another device")
    if bias is not None:
        torch._check_type(bias.dtype == hidden.dtype, lambda: f"{op}: bias dtype differs")
        torch._check_value(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            lambda: f"{op}: bias must be [V], got {list(bias.shape)}",
        )
    torch._check_type(labels.dtype == torch.int64, lambda: f"{op}: labels must be int64")
    torch._check_value(
        labels.dim() == 1 and labels.shape[0] == hidden.shape[0],
        lambda: f"{op}: labels must be [N] with N = {hidden.shape[0]}, got {list(labels.shape)}",
    )
    torch._check_value(
        0.0 <= label_smoothing <= 1.0,
        lambda: f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}",
    )
    torch._check_value(
        0.0 <= z_loss < float("inf"),
        lambda: f"{op}: z_loss must be a finite value >= 0, got {z_loss}",
    )


@torch.library.register_fake("stackwise::linear_cross_entropy_forward")
def _forward_fake(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss):
    _check("linear_cross_entropy_forward", hidden, weight, bias, labels, label_smoothing, z_loss)
    n = hidden.shape[0]
    return hidden.new_empty((n,), dtype=_acc_dtype(hidden)), labels.new_empty((n,))


def _grads_fake(hidden, weight, bias, weight_grad):
    gw = weight.new_empty(weight.shape if weight_grad else (0,))
    gb = hidden.new_empty(bias.shape if (bias is not None and weight_grad) else (0,))
    return hidden.new_empty(hidden.shape), gw, gb


@torch.library.register_fake("stackwise::linear_cross_entropy_backward")
def _backward_fake(
    grad_losses, hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, weight_grad
):
    op = "linear_cross_entropy_backward"
    _check(op, hidden, weight, bias, labels, label_smoothing, z_loss)
    torch._check_type(
        grad_losses.dtype in _FLOAT_DTYPES,
        lambda: f"{op}: grad_losses must be a float tensor, got {grad_losses.dtype}",
    )
    torch._check_value(
        grad_losses.dim() == 1 and grad_losses.shape[0] == hidden.shape[0],
        lambda: f"{op}: grad_losses must be [N], got {list(grad_losses.shape)}",
    )
    return _grads_fake(hidden, weight, bias, weight_grad)


@torch.library.register_fake("stackwise::linear_cross_entropy_fused")
def _fused_fake(
    hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss, reduction, weight_grad
):
    op = "linear_cross_entropy_fused"
    _check(op, hidden, weight, bias, labels, label_smoothing, z_loss)
    torch._check_value(
        reduction in ("mean", "sum"),
        lambda: f"{op}: reduction must be 'mean' or 'sum', got {reduction!r}",
    )
    loss = hidden.new_empty((), dtype=_acc_dtype(hidden))
    return (loss, *_grads_fake(hidden, weight, bias, weight_grad))


# -- autograd ----------------------------------------------------------------------------------


def _forward_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss = inputs
    ctx.params = (ignore_index, label_smoothing, z_loss)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, labels)


def _forward_backward(ctx, grad_losses: Tensor, _grad_predictions):
    hidden, weight, bias, labels = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    weight_grad = bool(need_w or need_b)
    with torch.no_grad():
        gh, gw, gb = torch.ops.stackwise.linear_cross_entropy_backward.default(
            grad_losses, hidden, weight, bias, labels, *ctx.params, weight_grad
        )
    grads = (
        gh if need_h else None,
        gw if need_w else None,
        gb if (need_b and ctx.has_bias) else None,
    )
    grads = first_order_only("linear_cross_entropy", grads, grad_losses, hidden, weight, bias)
    return (*grads, None, None, None, None)


torch.library.register_autograd(
    "stackwise::linear_cross_entropy_forward", _forward_backward, setup_context=_forward_setup
)


def _fused_setup(ctx, inputs, output) -> None:
    ctx.has_bias = inputs[2] is not None
    ctx.weight_grad = inputs[8]
    _, gh, gw, gb = output
    # The inputs are kept only so that a second-order graph through these gradients (which do
    # not depend on them in the autograd graph) raises instead of being silently zero.
    ctx.save_for_backward(gh, gw, gb, *inputs[:3])


def _fused_backward(ctx, grad_loss: Tensor, *_unused):
    gh, gw, gb, hidden, weight, bias = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    torch._check(
        not ((need_w or need_b) and not ctx.weight_grad),
        lambda: "linear_cross_entropy_fused: weight_grad=False but a weight gradient is needed",
    )
    grads = (
        gh * grad_loss if need_h else None,
        gw * grad_loss if need_w else None,
        gb * grad_loss if (need_b and ctx.has_bias) else None,
    )
    grads = first_order_only("linear_cross_entropy", grads, grad_loss, hidden, weight, bias)
    return (*grads, None, None, None, None, None, None)


torch.library.register_autograd(
    "stackwise::linear_cross_entropy_fused", _fused_backward, setup_context=_fused_setup
)
