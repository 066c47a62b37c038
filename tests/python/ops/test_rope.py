"""RoPE op: kernel vs oracle over dtypes, devices, odd shapes and strides, partial rotation,
position offsets and GQA shapes; the table helper; autograd; opcheck; torch.compile; and the
errors bad inputs raise."""

from __future__ import annotations

import pytest
import torch

import stackwise
from stackwise.ops.reference import rope_backward_reference, rope_reference
from utils import FLOAT_DTYPES, assert_close, devices_for, has_cuda_kernel

DEVICES = devices_for("rope")

# (B, Hq, Hk, S, D, rotary_dim): rotary_dim/2 of 1, 3 and 7 exercise the scalar tail alone, 16,
# 33 and 64 the vector body (+ tail); GQA (Hq != Hk), MQA (Hk = 1), S = 1 and 123.
CASES = [
    (1, 1, 1, 1, 2, 2),
    (2, 3, 1, 7, 7, 6),
    (1, 4, 2, 123, 14, 14),
    (2, 2, 2, 5, 66, 66),
    (1, 8, 2, 9, 128, 128),
    (2, 4, 4, 7, 192, 64),  # MLA-style partial rotation
    (1, 3, 1, 11, 192, 32),
    (1, 2, 3, 4, 33, 32),  # Hk > Hq is allowed too; odd D with pass-through tail
    (1, 1, 1, 2, 24, 24),  # h = 12 and 24: the half-vector bf16/fp16 step with AVX2/AVX-512
    (1, 2, 2, 3, 50, 48),
    (2, 2, 1, 0, 8, 8),  # empty sequence
]


def _inputs(case, dtype, device, seed=0):
    b, hq, hk, s, d, _ = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=gen, dtype=torch.float64).to(dtype).to(device)
    k = torch.randn(b, hk, s, d, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return q, k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("offset", [0, 5])
def test_forward_matches_reference(device, dtype, case, offset):
    q, k = _inputs(case, dtype, device)
    rd = case[-1]
    cos, sin = stackwise.ops.rope_tables(case[3] + 8, rd, device=device)
    qo, ko = stackwise.ops.rope(q, k, cos, sin, rotary_dim=rd, position_offset=offset)
    for out, x in ((qo, q), (ko, k)):
        assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    ref_q, ref_k = rope_reference(q, k, cos, sin, rd, offset)
    assert_close(qo, ref_q, "elementwise", dtype)
    assert_close(ko, ref_k, "elementwise", dtype)
    # Features past rotary_dim are copied exactly.
    assert torch.equal(qo[..., rd:], q[..., rd:]) and torch.equal(ko[..., rd:], k[..., rd:])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_backward_matches_reference(device, dtype, case):
    q, k = _inputs(case, dtype, device, seed=1)
    gq, gk = _inputs(case, dtype, device, seed=2)
    rd = case[-1]
    cos, sin = stackwise.ops.rope_tables(case[3] + 3, rd, device=device)
    q.requires_grad_(True)
    k.requires_grad_(True)
    qo, ko = stackwise.ops.rope(q, k, cos, sin, rotary_dim=rd, position_offset=3)
    torch.autograd.backward((qo, ko), (gq, gk))
    ref_gq, ref_gk = rope_backward_reference(gq, gk, cos, sin, rd, 3)
    assert_close(q.grad, ref_gq, "elementwise", dtype)
    assert_close(k.grad, ref_gk, "elementwise", dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_default_rotary_dim_is_head_size(device):
    q, k = _inputs((1, 2, 1, 6, 16, 16), torch.float32, device)
    cos, sin = stackwise.ops.rope_tables(6, 16, device=device)
    qo, ko = stackwise.ops.rope(q, k, cos, sin)
    ref_q, ref_k = rope_reference(q, k, cos, sin)
    assert_close(qo, ref_q, "elementwise", torch.float32)
    assert_close(ko, ref_k, "elementwise", torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(device, dtype):
    gen = torch.Generator().manual_seed(3)
    # A [B, S, H, D] projection viewed as [B, H, S, D], the usual attention layout.
    q = torch.randn(2, 9, 4, 40, generator=gen).to(dtype).to(device).transpose(1, 2)
    k = torch.randn(2, 9, 2, 40, generator=gen).to(dtype).to(device).transpose(1, 2)
    cos, sin = stackwise.ops.rope_tables(16, 32, device=device)
    cases = [
        (q, k),
        (q[:, :, 1:], k[:, :, 1:]),  # offset views along S
        (q[..., ::2].contiguous().transpose(2, 3).transpose(2, 3), k[..., ::2]),  # feature stride 2
        (q[:, :1].expand(2, 3, 9, 40), k),  # stride-0 heads
    ]
    for qq, kk in cases:
        rd = 32 if qq.shape[-1] >= 32 else 20
        cs, sn = (cos, sin) if rd == 32 else stackwise.ops.rope_tables(16, rd, device=device)
        qo, ko = stackwise.ops.rope(qq, kk, cs, sn, rotary_dim=rd, position_offset=2)
        ref_q, ref_k = rope_reference(qq, kk, cs, sn, rd, 2)
        assert_close(qo, ref_q, "elementwise", dtype)
        assert_close(ko, ref_k, "elementwise", dtype)


def test_tables_match_formula_and_are_cached():
    cos, sin = stackwise.ops.rope_tables(10, 8, theta=500.0)
    assert cos.shape == (10, 4) and cos.dtype == torch.float32
    pos = torch.arange(10, dtype=torch.float64)[:, None]
    inv = 500.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    torch.testing.assert_close(cos, (pos * inv).cos().float())
    torch.testing.assert_close(sin, (pos * inv).sin().float())
    again = stackwise.ops.rope_tables(10, 8, theta=500.0)
    assert again[0] is cos and again[1] is sin
    assert stackwise.ops.rope_tables(10, 8)[0] is not cos  # theta is part of the key


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 8), "max_positions must be a positive int"),
        ((4, 7), "rotary_dim must be a positive even int"),
        ((4, 0), "rotary_dim must be a positive even int"),
        ((4, 8, -1.0), "theta must be > 0"),
    ],
)
def test_tables_reject_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        stackwise.ops.rope_tables(*args)


def test_position_zero_is_identity_and_norm_is_kept():
    q, k = _inputs((1, 2, 2, 5, 16, 16), torch.float64, "cpu")
    cos, sin = stackwise.ops.rope_tables(8, 16)
    qo, ko = stackwise.ops.rope(q, k, cos, sin)
    torch.testing.assert_close(qo[:, :, 0], q[:, :, 0], rtol=0, atol=0)
    # A rotation keeps each pair's length.
    torch.testing.assert_close(qo.norm(dim=-1), q.norm(dim=-1))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    q, k = _inputs((2, 3, 1, 4, 10, 6), torch.float64, device)
    cos, sin = stackwise.ops.rope_tables(8, 6, device=device)
    q.requires_grad_(True)
    k.requires_grad_(True)

    def f(a, b):
        return stackwise.ops.rope(a, b, cos, sin, rotary_dim=6, position_offset=2)

    assert torch.autograd.gradcheck(f, (q, k))


def test_grad_of_one_output_only():
    q, k = _inputs((1, 2, 1, 3, 8, 8), torch.float64, "cpu")
    cos, sin = stackwise.ops.rope_tables(4, 8)
    q.requires_grad_(True)
    qo, _ = stackwise.ops.rope(q, k, cos, sin)
    qo.sum().backward()
    ref_gq, _ = rope_backward_reference(torch.ones_like(qo), torch.zeros_like(k), cos, sin)
    torch.testing.assert_close(q.grad, ref_gq)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, k = _inputs((1, 4, 2, 5, 12, 8), torch.float32, device)
    cos, sin = stackwise.ops.rope_tables(9, 8, device=device)
    op = torch.ops.stackwise.rope.default
    torch.library.opcheck(op, (q, k, cos, sin, 8, 1))
    torch.library.opcheck(
        op, (q.clone().requires_grad_(True), k.clone().requires_grad_(True), cos, sin, 8, 1)
    )
    torch.library.opcheck(torch.ops.stackwise.rope_backward.default, (q, k, cos, sin, 8, 4))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    cos, sin = stackwise.ops.rope_tables(16, 8)

    def f(q, k):
        qo, ko = stackwise.ops.rope(q * 2.0, k, cos, sin, rotary_dim=8, position_offset=3)
        return qo.sum(-1) + ko.sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    q, k = _inputs((2, 4, 4, 6, 12, 8), torch.float32, "cpu")
    q.requires_grad_(True)
    expected = f(q, k)
    actual = compiled(q, k)
    torch.testing.assert_close(actual, expected)
    (gq_e,) = torch.autograd.grad(expected.sum(), q)
    (gq_a,) = torch.autograd.grad(actual.sum(), q)
    torch.testing.assert_close(gq_a, gq_e)


# ---- bad inputs -------------------------------------------------------------------------------


def _good(d=8, rd=8, s=4, positions=8):
    q = torch.randn(1, 2, s, d)
    k = torch.randn(1, 1, s, d)
    cos, sin = stackwise.ops.rope_tables(positions, rd)
    return q, k, cos, sin


def test_rejects_wrong_ranks():
    q, k, cos, sin = _good()
    with pytest.raises(ValueError, match=r"rope: q must have shape \[B, H, S, D\]"):
        stackwise.ops.rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match=r"rope: k must have shape \[B, H, S, D\]"):
        stackwise.ops.rope(q, k[0], cos, sin)
    with pytest.raises(ValueError, match=r"rope: cos must have shape \[max_positions, 4\]"):
        stackwise.ops.rope(q, k, cos[None], sin)


def test_rejects_mismatched_shapes():
    q, k, cos, sin = _good()
    with pytest.raises(ValueError, match="k has shape .* but q has shape"):
        stackwise.ops.rope(q, torch.randn(1, 1, 4, 6), cos, sin, rotary_dim=6)
    with pytest.raises(ValueError, match="k has shape .* but q has shape"):
        stackwise.ops.rope(q, torch.randn(1, 1, 3, 8), cos, sin)
    with pytest.raises(ValueError, match="k has shape .* but q has shape"):
        stackwise.ops.rope(q, torch.randn(2, 1, 4, 8), cos, sin)
    with pytest.raises(ValueError, match=r"sin must have shape \[max_positions, 4\]"):
        stackwise.ops.rope(q, k, cos, sin[:, :3])
    with pytest.raises(ValueError, match="sin has shape .* but cos has shape"):
        stackwise.ops.rope(q, k, cos, sin[:6])


@pytest.mark.parametrize(("rd", "match"), [(5, "rotary_dim must be even"), (10, "<= the head")])
def test_rejects_bad_rotary_dim(rd, match):
    q, k, cos, sin = _good()
    with pytest.raises(ValueError, match=match):
        stackwise.ops.rope(q, k, cos, sin, rotary_dim=rd)
    with pytest.raises(ValueError, match="rotary_dim must be even, positive"):
        stackwise.ops.rope(q, k, cos, sin, rotary_dim=0)


def test_rejects_positions_outside_the_table():
    q, k, cos, sin = _good(s=4, positions=8)
    stackwise.ops.rope(q, k, cos, sin, position_offset=4)  # rows 4..7: fits exactly
    with pytest.raises(ValueError, match=r"position_offset \(5\) \+ sequence length \(4\) exceeds"):
        stackwise.ops.rope(q, k, cos, sin, position_offset=5)
    with pytest.raises(ValueError, match="position_offset must be >= 0"):
        stackwise.ops.rope(q, k, cos, sin, position_offset=-1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_rejects_integer_tensors(dtype):
    q, k, cos, sin = _good()
    with pytest.raises(TypeError, match="q must be float32, float64, float16 or bfloat16"):
        stackwise.ops.rope(q.to(dtype), k.to(dtype), cos, sin)
    with pytest.raises(TypeError, match="k has dtype .* but q has dtype Float"):
        stackwise.ops.rope(q, k.to(dtype), cos, sin)
    with pytest.raises(TypeError, match="cos must be float32"):
        stackwise.ops.rope(q, k, cos.to(dtype), sin)


def test_rejects_float64_tables():
    q, k, cos, sin = _good()
    with pytest.raises(TypeError, match="sin must be float32"):
        stackwise.ops.rope(q, k, cos, sin.double())


def test_rejects_mismatched_devices_meta():
    q, k, cos, sin = _good()
    with pytest.raises(RuntimeError, match="k is on meta but q is on cpu"):
        stackwise.ops.rope(q, k.to("meta"), cos, sin)
    with pytest.raises(RuntimeError, match="cos is on meta but q is on cpu"):
        stackwise.ops.rope(q, k, cos.to("meta"), sin)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.skipif(
    torch.cuda.is_available() and not has_cuda_kernel("rope"), reason="no CUDA kernel yet"
)
def test_rejects_mismatched_devices_cuda():
    q, k, cos, sin = _good()
    with pytest.raises(RuntimeError, match="cos is on cpu but q is on cuda"):
        stackwise.ops.rope(q.cuda(), k.cuda(), cos, sin.cuda())


def test_backward_op_names_its_arguments():
    q, k, cos, sin = _good()
    with pytest.raises(ValueError, match="grad_k has shape .* but grad_q has shape"):
        torch.ops.stackwise.rope_backward(q, k[..., :6], cos, sin, 8, 0)
