"""Quantization ops: bit-exact packing against a plain-PyTorch reference and bitsandbytes,
round-trip error bounds, the int8/fp8 scale layouts, quantized_linear, and bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stackwise import ops
from stackwise.exceptions import QuantizationError
from stackwise.ops import reference as ref
from utils import DEVICES

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _x(shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


# ---- NF4 ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("block_size", [32, 64, 256, 4096])
def test_nf4_bit_exact_with_reference(device, dtype, block_size):
    x = _x((8, 4096), dtype, device)
    packed, absmax = ops.quantize_nf4(x, block_size)
    ref_packed, ref_absmax = ref.quantize_nf4_reference(x.cpu(), block_size)
    assert packed.dtype == torch.uint8 and packed.shape == (x.numel() // 2,)
    assert absmax.dtype == torch.float32 and absmax.shape == (x.numel() // block_size,)
    assert torch.equal(packed.cpu(), ref_packed)
    assert torch.equal(absmax.cpu(), ref_absmax)
    out = ops.dequantize_nf4(packed, absmax, x.shape, block_size, dtype)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(
        out.cpu(), ref.dequantize_nf4_reference(ref_packed, ref_absmax, x.shape, block_size, dtype)
    )


@pytest.mark.parametrize("block_size", [32, 64, 128, 1024])
def test_nf4_bit_exact_with_bitsandbytes(block_size):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    x = _x((16, 2048), seed=3)
    x[0, :block_size] = 0.0  # an all-zero block
    x[1, 5] = 1e-30  # a tiny value next to larger ones
    packed, absmax = ops.quantize_nf4(x, block_size)
    q, state = bnb_f.quantize_4bit(x, blocksize=block_size, quant_type="nf4")
    assert torch.equal(packed, q.flatten())
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(
        ops.dequantize_nf4(packed, absmax, x.shape, block_size), bnb_f.dequantize_4bit(q, state)
    )


def test_nf4_codes_and_ties():
    code = ref.NF4_CODE
    # Each code value itself maps to its own index; a midpoint goes to the lower code.
    x = torch.cat([code, (code[:-1] + code[1:]) / 2, torch.zeros(64 - 31)])
    packed, absmax = ops.quantize_nf4(x, 64)
    codes = torch.stack([packed >> 4, packed & 0xF], 1).flatten()
    assert codes[:16].tolist() == list(range(16))
    assert codes[16:31].tolist() == list(range(15))
    assert float(absmax[0]) == 1.0


def test_nf4_roundtrip_statistical_bound():
    # Frozen bound for N(0,1) data, block 64: mean |err| / absmax ~ 0.035 measured; allow 0.045.
    x = _x((256, 1024), seed=5)
    packed, absmax = ops.quantize_nf4(x, 64)
    err = (ops.dequantize_nf4(packed, absmax, x.shape) - x).abs().reshape(-1, 64)
    rel = (err / absmax[:, None]).mean()
    assert rel < 0.045
    # Worst case: half the largest gap between codes (0.1609 .. -1.0 -> 0.304/2) of absmax.
    assert bool((err <= absmax[:, None] * 0.153).all())


# ---- int8 / fp8 ------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("axis", [-1, 0, None])
def test_int8_matches_reference_and_bound(device, dtype, axis):
    x = _x((7, 123), dtype, device, scale=3.0)
    q, scale = ops.quantize_int8(x, axis=axis)
    rq, rs = ref.quantize_int8_reference(x.cpu(), axis)
    assert q.dtype == torch.int8 and torch.equal(q.cpu(), rq)
    assert torch.equal(scale.cpu(), rs)
    y = ops.dequantize_int8(q, scale)
    # Analytic bound: at most half a step per element (plus the input's own rounding).
    assert bool(((y - x.float()).abs() <= scale / 2 + 1e-6).all())


def test_int8_blocks_and_zero_rows():
    x = _x((4, 256))
    x[1] = 0.0
    q, scale = ops.quantize_int8(x, block_size=64)
    assert scale.shape == (16,)
    assert bool((scale[4:8] == 0).all()) and bool((q[1] == 0).all())
    y = ops.dequantize_int8(q, scale)
    assert bool(((y - x).abs().reshape(16, 64) <= scale[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("axis", [-1, None])
def test_fp8_matches_reference(device, fmt, axis):
    x = _x((9, 77), torch.float32, device, scale=10.0)
    q, scale = ops.quantize_fp8(x, fmt, axis=axis)
    rq, rs = ref.quantize_fp8_reference(x.cpu(), fmt, axis)
    assert q.dtype == rq.dtype
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(scale.cpu(), rs)
    y = ops.dequantize_fp8(q, scale)
    rel = 2.0**-4 if fmt == "e4m3" else 2.0**-3  # half an ulp of the mantissa
    assert bool(((y - x).abs() <= x.abs() * rel + scale * 2.0**-9).all())


def test_to_half_refuses_overflow():
    assert ops.to_half(torch.tensor([1.0, 65504.0])).dtype == torch.float16
    with pytest.raises(QuantizationError, match="overflow float16"):
        ops.to_half(torch.tensor([1.0, 1e6]), name="w")
    assert torch.isinf(ops.to_half(torch.tensor([float("inf")]))).all()  # inf stays inf
    assert ops.to_half(torch.tensor([1e6]), torch.bfloat16).dtype == torch.bfloat16


# ---- quantized_linear ------------------------------------------------------------


def _qweight(fmt, w, block=64):
    if fmt == "nf4":
        p, a = ops.quantize_nf4(w, block)
        return p, a, ops.dequantize_nf4(p, a, w.shape, block)
    if fmt == "int8":
        q, s = ops.quantize_int8(w)
        return q, s, ops.dequantize_int8(q, s)
    q, s = ops.quantize_fp8(w, "e4m3")
    return q, s, ops.dequantize_fp8(q, s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["nf4", "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_out", [96, 1000])
def test_quantized_linear_matches_dequantized(device, fmt, dtype, n_out):
    n_in = 320  # 320 * 1000 % 64 == 0 but 320 % 64 != 0: tiles straddle rows
    w = _x((n_out, n_in), device=device, seed=1) * 0.05
    qw, sc, wd = _qweight(fmt, w)
    bias = _x((n_out,), dtype, device, seed=2)
    x = _x((3, 5, n_in), dtype, device, seed=3).requires_grad_(True)
    bias.requires_grad_(True)
    y = ops.quantized_linear(x, qw, sc, fmt, n_out, n_in, 64, bias)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = bias.detach().clone().requires_grad_(True)
    y_ref = F.linear(x2, wd.to(dtype), b2)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    torch.testing.assert_close(bias.grad, b2.grad, **tol)


def test_quantized_linear_opcheck_and_compile():
    w = _x((64, 128)) * 0.1
    p, a = ops.quantize_nf4(w)
    x = _x((4, 128)).requires_grad_(True)
    torch.library.opcheck(
        torch.ops.stackwise.quantized_linear.default, (x, p, a, "nf4", 64, 128, 64, None)
    )
    torch.library.opcheck(torch.ops.stackwise.quantize_nf4.default, (w, 64))
    torch.library.opcheck(
        torch.ops.stackwise.dequantize_nf4.default, (p, a, [64, 128], 64, torch.float32)
    )
    q8, s8 = torch.ops.stackwise.quantize_int8(w)
    torch.library.opcheck(torch.ops.stackwise.quantize_int8.default, (w,))
    torch.library.opcheck(torch.ops.stackwise.dequantize_int8.default, (q8, s8, torch.float32))


@pytest.mark.slow
def test_quantized_linear_torch_compile():
    w = _x((64, 128)) * 0.1
    p, a = ops.quantize_nf4(w)

    def f(x):
        return ops.quantized_linear(x, p, a, "nf4", 64, 128, 64).relu()

    x = _x((4, 128))
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_quantized_linear_gradcheck_fp64():
    w = _x((32, 64), torch.float64) * 0.1
    q, s = ops.quantize_int8(w)
    x = _x((3, 64), torch.float64).requires_grad_(True)
    b = _x((32,), torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, b: ops.quantized_linear(x, q, s, "int8", 32, 64, 64, b), (x, b)
    )


# ---- bad inputs ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.complex64, torch.bool])
def test_quantize_rejects_non_float(dtype):
    x = torch.zeros(64, dtype=dtype)
    for fn in (ops.quantize_nf4, ops.quantize_int8, ops.quantize_fp8):
        with pytest.raises(QuantizationError, match="must be float32"):
            fn(x)


def test_nf4_rejects_bad_block_sizes():
    with pytest.raises(QuantizationError, match="not a multiple of block_size 64"):
        ops.quantize_nf4(torch.randn(100))
    for bs in (16, 48, 8192):
        with pytest.raises(QuantizationError, match="power of two from 32 to 4096"):
            ops.quantize_nf4(torch.randn(8192), bs)
    p, a = ops.quantize_nf4(torch.randn(128))
    with pytest.raises(ValueError, match="packed has 64 bytes but shape"):
        ops.dequantize_nf4(p, a, (4, 64))


def test_quantized_linear_rejects_mismatch():
    p, a = ops.quantize_nf4(torch.randn(64, 128))
    with pytest.raises(ValueError, match="in_features=128"):
        ops.quantized_linear(torch.randn(2, 100), p, a, "nf4", 64, 128, 64)
    with pytest.raises(ValueError, match="fmt must be 'nf4', 'int8' or 'fp8'"):
        ops.quantized_linear(torch.randn(2, 128), p, a, "nf3", 64, 128, 64)
    with pytest.raises(ValueError, match="needs 2048 and 64"):
        ops.quantized_linear(torch.randn(2, 128), p, a, "nf4", 32, 128, 64)


# ---- double quantization --------------------------------------------------------------------


def test_double_quant_code_book_matches_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(ops.quant.dynamic_code_8bit(), bnb_f.create_dynamic_map(signed=True))


def test_double_quant_roundtrip_and_agreement_with_bitsandbytes():
    x = _x((256, 1024), seed=9)
    packed, absmax = ops.quantize_nf4(x, 64)
    codes, scales, offset = ops.double_quantize_absmax(absmax)
    assert codes.dtype == torch.uint8 and scales.shape == (absmax.numel() // 256,)
    back = ops.double_dequantize_absmax(codes, scales, offset)
    # The dynamic code's largest relative gap near |v| ~ 0.1..1 is ~1.4%: half of it bounds the
    # error relative to the block's scale.
    err = (back - absmax).abs().reshape(-1, 256)
    assert bool((err <= scales[:, None] * 0.0071 + 1e-7).all())
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    _, state = bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(scales, state.state2.absmax)
    assert float(offset) == float(state.offset)
    # We round to the nearest code; bitsandbytes' CPU search sometimes takes the second nearest.
    assert (codes != state.absmax).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_fused_few_rows_agrees_with_tiled(dtype):
    # Up to 16 rows take the fused NF4 kernel, 17 and more the dequantize-then-BLAS tiles.
    w = _x((192, 256), seed=11) * 0.05
    p, a = ops.quantize_nf4(w, 64)
    x = _x((17, 256), dtype, seed=12)
    tiled = ops.quantized_linear(x, p, a, "nf4", 192, 256, 64)
    fused = torch.cat([ops.quantized_linear(x[:16], p, a, "nf4", 192, 256, 64), tiled[16:]])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fused, tiled, **tol)
    g = _x((17, 192), dtype, seed=13)
    gx_tiled = torch.ops.stackwise.quantized_linear_backward(g, p, a, "nf4", 192, 256, 64)
    gx_fused = torch.ops.stackwise.quantized_linear_backward(g[:16], p, a, "nf4", 192, 256, 64)
    torch.testing.assert_close(gx_fused, gx_tiled[:16], **tol)
