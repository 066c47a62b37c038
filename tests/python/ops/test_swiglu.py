"""SwiGLU op: kernel vs oracle over dtypes, devices, odd shapes and strides; autograd; opcheck;
torch.compile; and the errors bad inputs must raise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import stackwise
from stackwise.ops.reference import swiglu_backward_reference, swiglu_reference
from utils import DEVICES, FLOAT_DTYPES, assert_close

# 1 and 7 exercise the scalar tail alone, 123 and 4099 vector body + tail, (0,) the empty case.
SHAPES = [(1,), (7,), (123,), (4099,), (3, 7, 123), (2, 0, 5), (0,)]


def _inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Spread wide enough to reach sigmoid's saturated tails (|x| > 17 in float32).
    g = (torch.randn(shape, generator=gen, dtype=torch.float64) * 6).to(dtype).to(device)
    u = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return g, u


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference(device, dtype, shape):
    g, u = _inputs(shape, dtype, device)
    out = stackwise.ops.swiglu(g, u)
    assert out.shape == g.shape and out.dtype == dtype and out.device == g.device
    assert out.is_contiguous()
    assert_close(out, swiglu_reference(g, u), "elementwise", dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference(device, dtype, shape):
    g, u = _inputs(shape, dtype, device, seed=1)
    dy = _inputs(shape, dtype, device, seed=2)[1]
    g.requires_grad_(True)
    u.requires_grad_(True)
    stackwise.ops.swiglu(g, u).backward(dy)
    ref_dg, ref_du = swiglu_backward_reference(dy, g.detach(), u.detach())
    assert_close(g.grad, ref_dg, "elementwise", dtype)
    assert_close(u.grad, ref_du, "elementwise", dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(device, dtype):
    base_g, base_u = _inputs((64, 130), dtype, device)
    cases = [
        (base_g.t(), base_u.t().contiguous()),  # transposed
        (base_g[:, ::3], base_u[:, ::3]),  # strided slice
        (base_g[1:, 1:], base_u[:-1, :-1]),  # offset views (misaligned start)
        (base_g[0].expand(5, 130), base_u[:5]),  # stride-0 broadcast view
    ]
    for g, u in cases:
        assert not g.is_contiguous() or not u.is_contiguous()
        assert_close(stackwise.ops.swiglu(g, u), swiglu_reference(g, u), "elementwise", dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_eager_pytorch(device):
    g, u = _inputs((17, 33), torch.float32, device)
    torch.testing.assert_close(stackwise.ops.swiglu(g, u), F.silu(g) * u)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_values_stay_finite(device):
    g = torch.tensor([-1e4, -100.0, -88.0, 0.0, 88.0, 100.0, 1e4], device=device)
    u = torch.ones_like(g)
    out = stackwise.ops.swiglu(g, u)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, F.silu(g))
    g.requires_grad_(True)
    stackwise.ops.swiglu(g, u).sum().backward()
    assert torch.isfinite(g.grad).all()


def test_grad_of_one_input_only():
    g, u = _inputs((9, 5), torch.float64, "cpu")
    u.requires_grad_(True)
    stackwise.ops.swiglu(g, u).sum().backward()
    torch.testing.assert_close(u.grad, F.silu(g))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    g, u = _inputs((3, 11), torch.float64, device)
    g.requires_grad_(True)
    u.requires_grad_(True)
    assert torch.autograd.gradcheck(stackwise.ops.swiglu, (g, u))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g, u = _inputs((4, 9), torch.float32, device)
    torch.library.opcheck(torch.ops.stackwise.swiglu.default, (g, u))
    torch.library.opcheck(
        torch.ops.stackwise.swiglu.default, (g.requires_grad_(True), u.requires_grad_(True))
    )
    dy = torch.randn_like(g)
    torch.library.opcheck(torch.ops.stackwise.swiglu_backward.default, (dy, g.detach(), u.detach()))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    def f(g, u):
        return stackwise.ops.swiglu(g * 2.0, u) + 1.0

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    g, u = _inputs((8, 16), torch.float32, "cpu")
    g.requires_grad_(True)
    expected = f(g, u)
    actual = compiled(g, u)
    torch.testing.assert_close(actual, expected)
    (dg_e,) = torch.autograd.grad(expected.sum(), g)
    (dg_a,) = torch.autograd.grad(actual.sum(), g)
    torch.testing.assert_close(dg_a, dg_e)


# ---- bad inputs -------------------------------------------------------------------------------


def test_rejects_mismatched_shapes():
    with pytest.raises(
        ValueError, match=r"swiglu: up has shape \[4, 5\] but gate has shape \[4, 4\]"
    ):
        stackwise.ops.swiglu(torch.randn(4, 4), torch.randn(4, 5))


def test_rejects_mismatched_dtypes():
    with pytest.raises(TypeError, match="up has dtype Double but gate has dtype Float"):
        stackwise.ops.swiglu(torch.randn(4), torch.randn(4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_rejects_integer_tensors(dtype):
    x = torch.ones(4, dtype=dtype)
    with pytest.raises(TypeError, match="gate must be float32, float64, float16 or bfloat16"):
        stackwise.ops.swiglu(x, x)


def test_rejects_mismatched_devices_meta():
    # A CPU and a meta tensor: works without a GPU, and must not reach a kernel.
    with pytest.raises(RuntimeError, match="up is on meta but gate is on cpu"):
        stackwise.ops.swiglu(torch.randn(4), torch.randn(4, device="meta"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_rejects_mismatched_devices_cuda():
    with pytest.raises(RuntimeError, match="up is on cpu but gate is on cuda"):
        stackwise.ops.swiglu(torch.randn(4, device="cuda"), torch.randn(4))


def test_backward_op_rejects_bad_grad_shape():
    g = torch.randn(3, 3)
    with pytest.raises(ValueError, match="grad_out has shape"):
        torch.ops.stackwise.swiglu_backward(torch.randn(3), g, g)
