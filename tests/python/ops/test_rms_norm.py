"""RMSNorm op: kernel vs oracle over dtypes, devices, odd shapes and strides; mixed weight dtypes;
deterministic grad_weight; autograd; opcheck; torch.compile; and the errors bad inputs raise."""

from __future__ import annotations

import pytest
import torch

import stackwise
from stackwise.ops.reference import rms_norm_backward_reference, rms_norm_reference
from utils import FLOAT_DTYPES, assert_close, devices_for, has_cuda_kernel

DEVICES = devices_for("rms_norm")

# D = 1 and 7 exercise the scalar tail alone, 33 and 4099 vector body + tail, 192 a whole number
# of vectors; leading shapes () .. (3, 7) and (2, 0) (no rows).
SHAPES = [(1,), (7,), (1, 33), (7, 123), (3, 7, 192), (2, 4099), (123, 64), (2, 0, 5)]


def _inputs(shape, dtype, device, seed=0, wdtype=None):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype).to(device)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)).to(wdtype or dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return x, w.to(device), dy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(device, dtype, shape):
    x, w, _ = _inputs(shape, dtype, device)
    out = stackwise.ops.rms_norm(x, w, eps=1e-5)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert out.is_contiguous()
    assert_close(out, rms_norm_reference(x, w, 1e-5), "elementwise", dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference(device, dtype, shape):
    x, w, dy = _inputs(shape, dtype, device, seed=1)
    x.requires_grad_(True)
    w.requires_grad_(True)
    stackwise.ops.rms_norm(x, w).backward(dy)
    ref_dx, ref_dw = rms_norm_backward_reference(dy, x, w)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close(x.grad, ref_dx, "reduction", dtype)
    assert_close(w.grad, ref_dw, "reduction", dtype)


def test_rstd_output():
    x, w, _ = _inputs((4, 3, 10), torch.bfloat16, "cpu")
    out, rstd = torch.ops.stackwise.rms_norm(x, w, 1e-6)
    assert rstd.shape == (4, 3) and rstd.dtype == torch.float32
    expected = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
    torch.testing.assert_close(rstd, expected)
    _, rstd64 = torch.ops.stackwise.rms_norm(x.double(), w.double(), 1e-6)
    assert rstd64.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "wdtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
)
def test_weight_of_another_dtype(device, dtype, wdtype):
    # Output in x's dtype; weight applied in x's accumulation type; weight.grad in its own dtype.
    x, w, dy = _inputs((9, 70), dtype, device, seed=3, wdtype=wdtype)
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = stackwise.ops.rms_norm(x, w)
    assert out.dtype == dtype
    assert_close(out, rms_norm_reference(x.detach(), w.detach()), "elementwise", dtype)
    out.backward(dy)
    ref_dx, ref_dw = rms_norm_backward_reference(dy, x, w)
    assert x.grad.dtype == dtype and w.grad.dtype == wdtype
    assert_close(x.grad, ref_dx, "reduction", dtype)
    assert_close(w.grad, ref_dw, "reduction", dtype if dtype != torch.float32 else wdtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(device, dtype):
    base, w, _ = _inputs((64, 130), dtype, device)
    cases = [
        (base.t(), w[:64]),  # transposed
        (base[:, ::3], w[: base[:, ::3].shape[-1]]),  # strided slice
        (base[1:, 1:], w[1:]),  # offset view (misaligned start)
        (base[0].expand(5, 130), w),  # stride-0 broadcast rows
        (base, torch.stack([w, w], -1)[:, 0]),  # strided weight
    ]
    for x, wt in cases:
        assert not x.is_contiguous() or not wt.is_contiguous()
        assert_close(stackwise.ops.rms_norm(x, wt), rms_norm_reference(x, wt), "elementwise", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_weight_is_deterministic(dtype):
    # The row reduction has a fixed order: the same bits run to run and for any thread count.
    x, w, dy = _inputs((1000, 96), dtype, "cpu", seed=4)
    _, rstd = torch.ops.stackwise.rms_norm(x, w, 1e-6)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, threads, 1):
            torch.set_num_threads(n)
            results.append(torch.ops.stackwise.rms_norm_backward(dy, x, w, rstd))
    finally:
        torch.set_num_threads(threads)
    for gx, gw in results[1:]:
        assert torch.equal(gx, results[0][0]) and torch.equal(gw, results[0][1])


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_rms_norm(device):
    x, w, _ = _inputs((17, 33), torch.float32, device)
    expected = torch.nn.functional.rms_norm(x, (33,), w, eps=1e-6)
    torch.testing.assert_close(stackwise.ops.rms_norm(x, w, 1e-6), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_rows_and_extreme_values(device):
    x = torch.zeros(3, 8, device=device)
    x[1] = 1e18  # x**2 summed stays inside float32 range (1e30 would overflow, as eager)
    x[2, 0] = 1e-30
    w = torch.ones(8, device=device)
    out = stackwise.ops.rms_norm(x, w, eps=1e-6)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    torch.testing.assert_close(out[1], torch.ones(8, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    x, w, _ = _inputs((3, 2, 11), torch.float64, device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: stackwise.ops.rms_norm(a, b, 1e-3), (x, w))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x, w, dy = _inputs((4, 9), torch.float32, device)
    op = torch.ops.stackwise.rms_norm.default
    torch.library.opcheck(op, (x, w, 1e-6))
    torch.library.opcheck(
        op, (x.clone().requires_grad_(True), w.clone().requires_grad_(True), 1e-6)
    )
    _, rstd = op(x, w, 1e-6)
    torch.library.opcheck(torch.ops.stackwise.rms_norm_backward.default, (dy, x, w, rstd))
    # bf16 activations with float32 weights: grad_weight comes back float32.
    xb, dyb = x.bfloat16(), dy.bfloat16()
    torch.library.opcheck(op, (xb.requires_grad_(True), w.clone().requires_grad_(True), 1e-6))
    _, rstd_b = op(xb, w, 1e-6)
    torch.library.opcheck(
        torch.ops.stackwise.rms_norm_backward.default, (dyb, xb.detach(), w, rstd_b)
    )


@pytest.mark.slow
def test_torch_compile_fullgraph():
    def f(x, w):
        return stackwise.ops.rms_norm(x * 2.0, w) + 1.0

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    x, w, _ = _inputs((8, 16), torch.float32, "cpu")
    x.requires_grad_(True)
    w.requires_grad_(True)
    expected = f(x, w)
    actual = compiled(x, w)
    torch.testing.assert_close(actual, expected)
    grads_e = torch.autograd.grad(expected.sum(), (x, w))
    grads_a = torch.autograd.grad(actual.sum(), (x, w))
    torch.testing.assert_close(grads_a, grads_e)


# ---- bad inputs -------------------------------------------------------------------------------


def test_rejects_weight_of_wrong_shape():
    with pytest.raises(ValueError, match=r"rms_norm: weight must have shape \[5\].*got \[4\]"):
        stackwise.ops.rms_norm(torch.randn(3, 5), torch.randn(4))
    with pytest.raises(ValueError, match=r"weight must have shape \[5\]"):
        stackwise.ops.rms_norm(torch.randn(3, 5), torch.randn(1, 5))


def test_rejects_wrong_rank_and_empty_features():
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):
        stackwise.ops.rms_norm(torch.tensor(1.0), torch.randn(1))
    with pytest.raises(ValueError, match="x's last .* dimension must be non-empty"):
        stackwise.ops.rms_norm(torch.randn(3, 0), torch.randn(0))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_rejects_integer_tensors(dtype):
    with pytest.raises(TypeError, match="x must be float32, float64, float16 or bfloat16"):
        stackwise.ops.rms_norm(torch.ones(2, 4, dtype=dtype), torch.ones(4))
    with pytest.raises(TypeError, match="weight must be float32, float64, float16 or bfloat16"):
        stackwise.ops.rms_norm(torch.ones(2, 4), torch.ones(4, dtype=dtype))


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf")])
def test_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        stackwise.ops.rms_norm(torch.randn(2, 4), torch.randn(4), eps)


def test_rejects_mismatched_devices_meta():
    with pytest.raises(RuntimeError, match="weight is on meta but x is on cpu"):
        stackwise.ops.rms_norm(torch.randn(2, 4), torch.randn(4, device="meta"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.skipif(
    torch.cuda.is_available() and not has_cuda_kernel("rms_norm"), reason="no CUDA kernel yet"
)
def test_rejects_mismatched_devices_cuda():
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        stackwise.ops.rms_norm(torch.randn(2, 4, device="cuda"), torch.randn(4))


def test_backward_op_rejects_bad_arguments():
    x, w = torch.randn(3, 4), torch.randn(4)
    rstd = torch.ones(3)
    with pytest.raises(ValueError, match="grad_out has shape"):
        torch.ops.stackwise.rms_norm_backward(torch.randn(3), x, w, rstd)
    with pytest.raises(ValueError, match=r"rstd must have shape \[3\]"):
        torch.ops.stackwise.rms_norm_backward(x, x, w, torch.ones(4))
    with pytest.raises(TypeError, match="rstd must have dtype Float"):
        torch.ops.stackwise.rms_norm_backward(x, x, w, rstd.double())
