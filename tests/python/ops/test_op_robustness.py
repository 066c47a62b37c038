"""Regression tests for inputs that used to crash the native ops or come back silently wrong:
size products that overflow int64, RoPE offsets past the table, attention with head dim 0 or a
non-finite scale, NaN/inf in quantization, second-order gradients, and fake (meta) kernels that
accepted what the CPU kernels reject. Each case runs in a subprocess where it could crash."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from stackwise import ops
from stackwise.ops import reference as ref

REPO = Path(__file__).resolve().parents[3]
OPS = torch.ops.stackwise


def _in_subprocess(code: str) -> subprocess.CompletedProcess:
    prelude = f"import sys; sys.path.insert(0, {str(REPO / 'python')!r})\nimport torch, stackwise\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("op", ["quantized_linear", "quantized_linear_backward"])
def test_nf4_size_product_overflow_is_an_error_not_a_crash(op):
    # in_features * out_features = 2**64 wraps to 0 in int64: the empty weight used to pass.
    x_arg = "torch.empty(0, 2**32)" if op == "quantized_linear" else "torch.empty(0, 2**32)"
    extra = ", None" if op == "quantized_linear" else ""
    r = _in_subprocess(
        f"""
        x = {x_arg}
        try:
            torch.ops.stackwise.{op}(x, torch.empty(0, dtype=torch.uint8), torch.empty(0),
                                     "nf4", 2**32, 2**32, 64{extra})
        except ValueError as e:
            print("ERROR:", e)
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "out_features * in_features" in r.stdout and "64-bit" in r.stdout


def test_dequantize_nf4_shape_overflow():
    with pytest.raises(ValueError, match="64-bit size"):
        OPS.dequantize_nf4(
            torch.empty(0, dtype=torch.uint8), torch.empty(0), [2**32, 2**32], 64, torch.float32
        )


@pytest.mark.parametrize("op", ["rope", "rope_backward"])
@pytest.mark.parametrize("offset", [2**63 - 1, 2**63 - 3, -1, -(2**63)])
def test_rope_offset_past_the_table(op, offset):
    cos, sin = ops.rope_tables(16, 8)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="position_offset"):
        getattr(OPS, op)(q, q, cos, sin, 8, offset)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="position_offset"):
        f = mode.from_tensor
        getattr(OPS, op)(f(q), f(q), f(cos), f(sin), 8, offset)


@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_attention_head_dim_zero_is_rejected(hkv):
    q, k, v = torch.randn(1, 4, 5, 0), torch.randn(1, hkv, 5, 0), torch.randn(1, hkv, 5, 3)
    with pytest.raises(ValueError, match="head dim"):
        OPS.attention_forward(q, k, v, None, False, None)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="head dim"):
        OPS.attention_forward(
            mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(v), None, False, None
        )


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_attention_non_finite_scale_is_rejected(scale):
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ops.attention(q, q, q, scale=scale)
    out, lse = OPS.attention_forward(q, q, q, None, False, 0.5)
    g = torch.ones_like(out)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        OPS.attention_backward(g, q, q, q, out, lse, None, False, scale)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nf4_non_finite_block_dequantizes_to_nan(bad):
    x = torch.randn(4, 64)
    x[1, 5] = bad
    packed, absmax = ops.quantize_nf4(x, 64)
    assert math.isnan(float(absmax[1]))
    out = ops.dequantize_nf4(packed, absmax, x.shape, 64)
    assert bool(out[1].isnan().all())
    good = torch.cat([x[:1], x[2:]])
    ref_packed, ref_absmax = ref.quantize_nf4_reference(good, 64)
    assert torch.equal(absmax[[0, 2, 3]], ref_absmax)  # other blocks exactly as before
    assert torch.equal(
        out[[0, 2, 3]].reshape(-1),
        ref.dequantize_nf4_reference(ref_packed, ref_absmax, good.shape, 64).reshape(-1),
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("fmt", ["int8", "e4m3", "e5m2"])
def test_rows_non_finite_row_dequantizes_to_nan(bad, fmt):
    x = torch.randn(3, 32)
    x[1, 7] = bad
    if fmt == "int8":
        q, s = ops.quantize_int8(x)
        out = ops.dequantize_int8(q, s)
    else:
        q, s = ops.quantize_fp8(x, fmt)
        out = ops.dequantize_fp8(q, s)
    assert math.isnan(float(s[1]))
    assert bool(out[1].isnan().all()) and bool(out[[0, 2]].isfinite().all())


def test_dequantize_int8_inverts_1d_blocks_and_0d():
    x = torch.randn(96)
    q, s = ops.quantize_int8(x, block_size=32)
    assert s.shape == (3,)
    out = ops.dequantize_int8(q, s)
    assert out.shape == x.shape and float((out - x).abs().max()) <= float(s.max()) / 2 + 1e-7
    x0 = torch.tensor(2.5)
    q0, s0 = ops.quantize_int8(x0, axis=None)
    out0 = ops.dequantize_int8(q0, s0)
    assert out0.shape == () and abs(float(out0) - 2.5) <= float(s0) / 2 + 1e-7


_DOUBLE = {
    "swiglu": (lambda a, b: ops.swiglu(a, b), [(3, 4), (3, 4)]),
    "rms_norm": (lambda a, w: ops.rms_norm(a, w), [(3, 4), (4,)]),
    "rope": (
        lambda q, k: sum(t.pow(2).sum() for t in ops.rope(q, k, *ops.rope_tables(8, 4))),
        [(1, 2, 3, 4), (1, 2, 3, 4)],
    ),
    "linear_attention": (
        lambda q, k, v: ops.linear_attention(q.abs(), k.abs(), v),
        [(1, 2, 3, 4)] * 3,
    ),
    "attention": (lambda q, k, v: ops.attention(q, k, v), [(1, 2, 3, 4)] * 3),
}


@pytest.mark.parametrize("name", list(_DOUBLE))
def test_double_backward_raises_naming_the_op(name):
    fn, shapes = _DOUBLE[name]
    xs = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    grads = torch.autograd.grad(fn(*xs).sum(), xs, create_graph=True)
    total = sum(g.sum() for g in grads)
    with pytest.raises(RuntimeError, match=f"{name}: second-order gradients are not implemented"):
        torch.autograd.grad(total, xs)
    # First-order gradients are unaffected, with or without create_graph.
    plain = torch.autograd.grad(fn(*xs).sum(), xs)
    for a, b in zip(grads, plain, strict=True):
        assert torch.equal(a.detach(), b)


def _fake_and_real(op, *args):
    """(real error type or None, fake error type or None) for one call."""

    def run(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the type is what is compared
            return type(e)
        return None

    real = run(lambda: op(*args))
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = run(lambda: op(*fargs))
    return real, fake


_U8, _F32 = torch.uint8, torch.float32
_REJECTED = [
    ("rms_norm eps nan", OPS.rms_norm, (torch.randn(2, 4), torch.ones(4), math.nan)),
    ("quantize_nf4 block 0", OPS.quantize_nf4, (torch.randn(64), 0)),
    ("quantize_nf4 block 48", OPS.quantize_nf4, (torch.randn(96), 48)),
    ("quantize_nf4 int x", OPS.quantize_nf4, (torch.ones(64, dtype=torch.int32), 64)),
    ("quantize_int8 1-D", OPS.quantize_int8, (torch.randn(8),)),
    ("quantize_int8 3-D", OPS.quantize_int8, (torch.randn(2, 2, 2),)),
    ("quantize_fp8 bad dtype", OPS.quantize_fp8, (torch.randn(2, 2), torch.int8)),
    (
        "dequantize_int8 1-D q",
        OPS.dequantize_int8,
        (torch.ones(4, dtype=torch.int8), torch.ones(4), _F32),
    ),
    (
        "dequantize_int8 scale shape",
        OPS.dequantize_int8,
        (torch.ones(2, 4, dtype=torch.int8), torch.ones(3), _F32),
    ),
    (
        "dequantize_int8 scale dtype",
        OPS.dequantize_int8,
        (torch.ones(2, 4, dtype=torch.int8), torch.ones(2, dtype=torch.float64), _F32),
    ),
    ("dequantize_int8 q dtype", OPS.dequantize_int8, (torch.ones(2, 4), torch.ones(2), _F32)),
    (
        "dequantize_fp8 out dtype",
        OPS.dequantize_fp8,
        (torch.zeros(2, 4).to(torch.float8_e4m3fn), torch.ones(2), torch.int32),
    ),
    (
        "dequantize_nf4 absmax dtype",
        OPS.dequantize_nf4,
        (torch.zeros(32, dtype=_U8), torch.ones(1, dtype=torch.float64), [64], 64, _F32),
    ),
    (
        "dequantize_nf4 absmax count",
        OPS.dequantize_nf4,
        (torch.zeros(32, dtype=_U8), torch.ones(2), [64], 64, _F32),
    ),
    (
        "dequantize_nf4 packed dtype",
        OPS.dequantize_nf4,
        (torch.zeros(32, dtype=torch.int8), torch.ones(1), [64], 64, _F32),
    ),
    (
        "dequantize_nf4 negative shape",
        OPS.dequantize_nf4,
        (torch.zeros(32, dtype=_U8), torch.ones(1), [-64], 64, _F32),
    ),
    (
        "quantized_linear fmt",
        OPS.quantized_linear,
        (
            torch.randn(2, 64),
            torch.zeros(2, 64, dtype=torch.int8),
            torch.ones(2),
            "int4",
            2,
            64,
            64,
            None,
        ),
    ),
    (
        "quantized_linear nf4 sizes",
        OPS.quantized_linear,
        (torch.randn(2, 64), torch.zeros(10, dtype=_U8), torch.ones(2), "nf4", 2, 64, 64, None),
    ),
    (
        "quantized_linear int8 shape",
        OPS.quantized_linear,
        (
            torch.randn(2, 64),
            torch.zeros(3, 64, dtype=torch.int8),
            torch.ones(2),
            "int8",
            2,
            64,
            64,
            None,
        ),
    ),
    (
        "quantized_linear scales dtype",
        OPS.quantized_linear,
        (
            torch.randn(2, 64),
            torch.zeros(2, 64, dtype=torch.int8),
            torch.ones(2, dtype=torch.half),
            "int8",
            2,
            64,
            64,
            None,
        ),
    ),
    (
        "quantized_linear bias",
        OPS.quantized_linear,
        (
            torch.randn(2, 64),
            torch.zeros(2, 64, dtype=torch.int8),
            torch.ones(2),
            "int8",
            2,
            64,
            64,
            torch.ones(3),
        ),
    ),
    (
        "quantized_linear zero features",
        OPS.quantized_linear,
        (
            torch.randn(2, 0),
            torch.zeros(2, 0, dtype=torch.int8),
            torch.ones(2),
            "int8",
            2,
            0,
            64,
            None,
        ),
    ),
    (
        "quantized_linear_backward fmt",
        OPS.quantized_linear_backward,
        (torch.randn(2, 2), torch.zeros(2, 64, dtype=torch.int8), torch.ones(2), "int4", 2, 64, 64),
    ),
    (
        "rms_norm_backward rstd dtype",
        OPS.rms_norm_backward,
        (torch.randn(2, 4), torch.randn(2, 4), torch.ones(4), torch.ones(2, dtype=torch.float64)),
    ),
    (
        "rms_norm_backward grad dtype",
        OPS.rms_norm_backward,
        (torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4), torch.ones(4), torch.ones(2)),
    ),
]


@pytest.mark.parametrize("case", _REJECTED, ids=[c[0] for c in _REJECTED])
def test_fake_kernels_reject_what_the_cpu_kernels_reject(case):
    _, op, args = case
    real, fake = _fake_and_real(op, *args)
    assert real is not None, "the CPU kernel accepts this input"
    assert fake is real, f"CPU raises {real.__name__}, fake raised {fake}"
