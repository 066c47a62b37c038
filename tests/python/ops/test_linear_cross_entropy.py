"""Linear cross-entropy op: losses and gradients against F.linear + F.cross_entropy over dtypes,
devices, every option (bias, ignore_index, label smoothing, z-loss, the three reductions), odd
shapes; the all-ignored batch; tied heads; gradcheck, opcheck, torch.compile; bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import stackwise
from stackwise.ops import linear_cross_entropy, linear_cross_entropy_with_predictions
from stackwise.ops.reference import linear_cross_entropy_reference
from utils import DEVICES, FLOAT_DTYPES, TOLERANCES

OPS = torch.ops.stackwise
IGNORE = -100


def _inputs(n, d, v, dtype, device, bias=False, ignore_every=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).to(device)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) * d**-0.5).to(dtype).to(device)
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.1).to(dtype).to(device)
    y = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = IGNORE
    return h, w, (b if bias else None), y.to(device)


def _close(actual, expected, dtype):
    rtol, atol = TOLERANCES[("linear_cross_entropy", dtype)]
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, rtol=rtol, atol=atol * max(scale, 1.0)
    )


def _grads(fn, h, w, b, y, **kw):
    """(loss, grad_h, grad_w, grad_b) of fn on fresh leaf copies (fp64 for the reference)."""
    hh = h.detach().clone().requires_grad_(True)
    ww = w.detach().clone().requires_grad_(True)
    bb = None if b is None else b.detach().clone().requires_grad_(True)
    loss = fn(hh, ww, y, bb, **kw)
    out = (
        loss
        if loss.dim() == 0
        else (
            loss
            * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).view_as(
                loss
            )
        ).sum()
    )
    params = [hh, ww] + ([bb] if bb is not None else [])
    grads = torch.autograd.grad(out, params)
    return (loss.detach(), *grads, None) if bb is None else (loss.detach(), *grads)


OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"label_smoothing": 0.2, "z_loss": 0.05},
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(device, dtype, reduction, options, bias):
    h, w, b, y = _inputs(37, 24, 301, dtype, device, bias=bias)
    got = _grads(linear_cross_entropy, h, w, b, y, reduction=reduction, **options)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    want = _grads(
        linear_cross_entropy_reference,
        h.to(acc),
        w.to(acc),
        None if b is None else b.to(acc),
        y,
        reduction=reduction,
        **options,
    )
    assert got[0].dtype == acc
    _close(got[0], want[0], torch.float32 if dtype != torch.float64 else dtype)
    for g, e in zip(got[1:], want[1:], strict=True):
        if e is None:
            assert g is None
            continue
        assert g.dtype == dtype
        _close(g, e, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 3, 2), (123, 16, 1000), (600, 8, 259)])
def test_odd_shapes_and_many_chunks(device, shape):
    # 600 x 1000 logits exceed one CPU chunk (256K logits): several chunks and a short tail.
    n, d, v = shape
    h, w, b, y = _inputs(n, d, v, torch.float64, device, bias=True, ignore_every=5)
    got = _grads(linear_cross_entropy, h, w, b, y, label_smoothing=0.1)
    want = _grads(linear_cross_entropy_reference, h, w, b, y, label_smoothing=0.1)
    for g, e in zip(got, want, strict=True):
        _close(g, e, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_plain_pytorch_float32(device):
    h, w, _, y = _inputs(64, 32, 500, torch.float32, device)
    got = linear_cross_entropy(h, w, y)
    want = F.cross_entropy(F.linear(h, w), y, ignore_index=IGNORE)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_batched_leading_dims_and_non_contiguous(device):
    h, w, _, y = _inputs(24, 16, 50, torch.float32, device)
    h3 = h.reshape(4, 6, 16).transpose(0, 1)  # [6, 4, 16], non-contiguous
    y3 = y.reshape(4, 6).t()
    wt = w.t().contiguous().t()  # same values, column-major storage
    got = linear_cross_entropy(h3, wt, y3, reduction="none")
    assert got.shape == (6, 4)
    want = linear_cross_entropy_reference(h3, w, y3, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_predictions_are_argmax(device):
    h, w, _, y = _inputs(50, 8, 40, torch.float32, device)
    losses, preds = linear_cross_entropy_with_predictions(h, w, y)
    torch.testing.assert_close(losses, linear_cross_entropy_reference(h, w, y, reduction="none"))
    assert torch.equal(preds, F.linear(h, w).argmax(-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_batch_is_zero_with_zero_gradients(device, reduction):
    """Defined behaviour: a batch with no label has loss 0 and zero gradients (not NaN)."""
    h, w, _, y = _inputs(10, 8, 20, torch.float32, device)
    y = torch.full_like(y, IGNORE)
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = linear_cross_entropy(hh, ww, y, reduction=reduction)
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert torch.all(hh.grad == 0) and torch.all(ww.grad == 0)


def test_custom_ignore_index_inside_the_vocabulary():
    h, w, _, y = _inputs(30, 8, 20, torch.float32, "cpu", ignore_every=0)
    y[::2] = 5
    got = linear_cross_entropy(h, w, y, ignore_index=5)
    want = F.cross_entropy(F.linear(h, w), y, ignore_index=5)
    torch.testing.assert_close(got, want)


def test_tied_head_gradient_lands_in_the_embedding():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 16)
    ids = torch.randint(0, 50, (4, 9))
    labels = torch.randint(0, 50, (4, 9))

    def run(loss_fn):
        emb.weight.grad = None
        h = torch.tanh(emb(ids))
        loss_fn(h, emb.weight, labels).backward()
        return emb.weight.grad.clone()

    got = run(lambda h, w, y: linear_cross_entropy(h, w, y))
    want = run(lambda h, w, y: F.cross_entropy(F.linear(h, w).flatten(0, 1), y.flatten()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    h, w, _, y = _inputs(20, 8, 30, torch.float32, "cpu")
    hh = h.clone().requires_grad_(True)
    loss = linear_cross_entropy(hh, w, y)
    loss.backward()
    ref = h.clone().requires_grad_(True)
    F.cross_entropy(F.linear(ref, w), y, ignore_index=IGNORE).backward()
    torch.testing.assert_close(hh.grad, ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(device, reduction):
    h, w, b, y = _inputs(6, 4, 9, torch.float64, device, bias=True)
    for t in (h, w, b):
        t.requires_grad_(True)

    def fn(h, w, b):
        return linear_cross_entropy(
            h, w, y, b, label_smoothing=0.1, z_loss=0.01, reduction=reduction
        )

    assert torch.autograd.gradcheck(fn, (h, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    h, w, b, y = _inputs(13, 8, 33, torch.float32, device, bias=True)
    args = (IGNORE, 0.1, 0.01)
    OPS_ = OPS
    torch.library.opcheck(OPS_.linear_cross_entropy_forward.default, (h, w, b, y, *args))
    torch.library.opcheck(
        OPS_.linear_cross_entropy_forward.default,
        (h.clone().requires_grad_(True), w.clone().requires_grad_(True), None, y, *args),
    )
    g = torch.rand(13, device=device)
    torch.library.opcheck(OPS_.linear_cross_entropy_backward.default, (g, h, w, b, y, *args, True))
    torch.library.opcheck(
        OPS_.linear_cross_entropy_backward.default, (g, h, w, None, y, *args, False)
    )
    for red in ("mean", "sum"):
        torch.library.opcheck(
            OPS_.linear_cross_entropy_fused.default, (h, w, b, y, *args, red, True)
        )
    torch.library.opcheck(
        OPS_.linear_cross_entropy_fused.default,
        (h.clone().requires_grad_(True), w.clone().requires_grad_(True), b, y, *args, "mean", True),
    )


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction):
    w = torch.randn(40, 16) * 0.3

    def f(h, y):
        return linear_cross_entropy(torch.tanh(h), w, y, reduction=reduction, z_loss=1e-3).sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    h, _, _, y = _inputs(12, 16, 40, torch.float32, "cpu")
    h.requires_grad_(True)
    expected = f(h, y)
    actual = compiled(h, y)
    torch.testing.assert_close(actual, expected)
    (g_e,) = torch.autograd.grad(expected, h)
    (g_a,) = torch.autograd.grad(compiled(h, y), h)
    torch.testing.assert_close(g_a, g_e)


def test_second_order_is_refused():
    h, w, _, y = _inputs(5, 4, 6, torch.float64, "cpu")
    h.requires_grad_(True)
    (g,) = torch.autograd.grad(linear_cross_entropy(h, w, y), h, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order"):
        g.sum().backward()


# ---- bad inputs -------------------------------------------------------------------------------


def _call(h, w, y, b=None, **kw):
    return OPS.linear_cross_entropy_forward(
        h, w, b, y, kw.get("ii", IGNORE), kw.get("ls", 0.0), kw.get("z", 0.0)
    )


def test_rejects_label_out_of_range():
    h, w, _, y = _inputs(8, 4, 10, torch.float32, "cpu")
    y[3] = 10
    with pytest.raises(ValueError, match=r"labels\[3\] = 10 is outside \[0, 10\)"):
        linear_cross_entropy(h, w, y)
    y[3] = -1
    with pytest.raises(ValueError, match="labels.*-1.*ignore_index"):
        linear_cross_entropy(h, w, y)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda h, w, y: (h[0], w, y[:1]), "hidden must be \\[N, d\\]"),
        (lambda h, w, y: (h, w[:, :3], y), "weight must be \\[V, d\\]"),
        (lambda h, w, y: (h, w.double(), y), "weight has dtype"),
        (lambda h, w, y: (h.int(), w, y), "hidden must be float32"),
        (lambda h, w, y: (h, w, y.int()), "labels must be int64"),
        (lambda h, w, y: (h, w, y[:-1]), "labels must be \\[N\\]"),
        (lambda h, w, y: (h, w[:0], y), "weight has no rows"),
    ],
)
def test_rejects_bad_shapes_and_dtypes(bad, match):
    h, w, _, y = _inputs(8, 4, 10, torch.float32, "cpu")
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        _call(*bad(h, w, y))


def test_rejects_bad_bias_and_options():
    h, w, _, y = _inputs(8, 4, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="bias must be \\[V\\]"):
        _call(h, w, y, torch.zeros(9))
    with pytest.raises(TypeError, match="bias has dtype"):
        _call(h, w, y, torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        _call(h, w, y, ls=1.5)
    with pytest.raises(ValueError, match="z_loss must be"):
        _call(h, w, y, z=-1.0)
    with pytest.raises(ValueError, match="reduction must be"):
        linear_cross_entropy(h, w, y, reduction="max")
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        OPS.linear_cross_entropy_fused(h, w, None, y, IGNORE, 0.0, 0.0, "none", True)
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(h, w, y[:4])


def test_rejects_mismatched_devices_meta():
    h, w, _, y = _inputs(8, 4, 10, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="device"):
        _call(h, w.to("meta"), y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_rejects_mismatched_devices_cuda():
    h, w, _, y = _inputs(8, 4, 10, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="same device|must be a"):
        _call(h.cuda(), w, y.cuda())
    with pytest.raises(RuntimeError, match="labels is on"):
        _call(h.cuda(), w.cuda(), y)


def test_exported_from_package():
    assert stackwise.ops.linear_cross_entropy is linear_cross_entropy
