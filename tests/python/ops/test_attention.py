"""Attention op: kernel vs oracle over dtypes, shapes (MHA/GQA/MQA, Dqk != Dv), causal and
padding masks (fully masked rows and batch entries), strided inputs; FlashAttention's
low-precision error rule; gradcheck; opcheck; torch.compile; bad inputs; and the memory contract
(autograd saves O(S) per row, the backward allocates nothing S x S)."""

from __future__ import annotations

import pytest
import torch

import stackwise
from stackwise.ops.attention_dispatch import cuda_unsupported_reason
from stackwise.ops.reference import attention_reference
from utils import DEVICES, FLOAT_DTYPES, assert_close

# (B, Hq, Hkv, S, Dqk, Dv): MHA, GQA 4:1 and 2:1, MQA; S of 1, 7, 123, 512 (one block, a partial
# block, several blocks with a tail); D of 32, 64, 96, 128, 256 and MLA's 192/128 (every pair
# the CUDA kernel is instantiated for, stackwise.ops.attention_dispatch).
SHAPES = [
    (1, 1, 1, 1, 32, 32),
    (2, 2, 2, 7, 64, 64),
    (1, 4, 1, 7, 32, 32),
    (2, 4, 2, 123, 64, 64),
    (1, 8, 2, 123, 128, 128),
    (1, 2, 1, 123, 192, 128),
    (1, 4, 4, 512, 64, 64),
    (1, 4, 1, 512, 128, 128),
    (1, 2, 2, 512, 192, 128),
    (2, 3, 3, 77, 32, 64),
    (1, 4, 2, 77, 96, 96),
    (1, 2, 2, 130, 256, 256),
]
MASKS = ["none", "random", "empty_rows"]


def _has_kernel(device: str) -> bool:
    key = "CUDA" if device == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key("stackwise::attention_forward", key)


def _skip_without_kernel(device: str, dtype=None, dqk=None, dv=None) -> None:
    if not _has_kernel(device):
        pytest.skip(f"no {device} kernel of stackwise::attention_forward in this build")
    if device == "cuda" and cuda_unsupported_reason(dtype, dqk, dv) is not None:
        pytest.skip(
            f"{cuda_unsupported_reason(dtype, dqk, dv)} (test_cuda_rejects_unsupported_inputs "
            "checks the error otherwise)"
        )


def _inputs(shape, dtype, device, seed=0, requires_grad=False):
    b, hq, hkv, s, dqk, dv = shape
    gen = torch.Generator().manual_seed(seed)

    def make(*size):
        t = torch.randn(size, generator=gen, dtype=torch.float64).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    return make(b, hq, s, dqk), make(b, hkv, s, dqk), make(b, hkv, s, dv)


def _mask(kind, b, s, device, seed=0):
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(seed + 100)
    mask = torch.rand(b, s, generator=gen) > 0.3
    if kind == "empty_rows":
        # Batch 0: the first keys are padded, so the first causal rows see nothing; the last
        # batch entry (when B > 1) is padded entirely.
        mask[0, : max(1, s // 3)] = False
        if b > 1:
            mask[-1] = False
    return mask.to(device)


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def _id(shape):
    return "B{}_Hq{}_Hkv{}_S{}_D{}x{}".format(*shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
def test_forward_matches_reference(device, dtype, shape, causal, mask_kind):
    _skip_without_kernel(device, dtype, shape[4], shape[5])
    q, k, v = _inputs(shape, dtype, device)
    mask = _mask(mask_kind, shape[0], shape[3], device)
    out = stackwise.ops.attention(q, k, v, causal=causal, key_padding_mask=mask)
    b, hq, _, s, _, dv = shape
    assert out.shape == (b, hq, s, dv) and out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    ref = attention_reference(q, k, v, causal=causal, key_padding_mask=mask)
    assert_close(out, ref, "attention", dtype)


def _grads(fn, q, k, v, dout):
    out = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
def test_backward_matches_reference(device, dtype, shape, causal, mask_kind):
    _skip_without_kernel(device, dtype, shape[4], shape[5])
    q, k, v = _inputs(shape, dtype, device, seed=1, requires_grad=True)
    mask = _mask(mask_kind, shape[0], shape[3], device)
    dout = torch.randn(shape[0], shape[1], shape[3], shape[5], dtype=torch.float64).to(dtype)
    dout = dout.to(device)
    got = _grads(
        lambda a, b_, c: stackwise.ops.attention(a, b_, c, causal=causal, key_padding_mask=mask),
        q,
        k,
        v,
        dout,
    )
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    qa, ka, va = (t.detach().to(acc).requires_grad_(True) for t in (q, k, v))
    expected = _grads(
        lambda a, b_, c: attention_reference(a, b_, c, causal=causal, key_padding_mask=mask),
        qa,
        ka,
        va,
        dout.to(acc),
    )
    for name, g, e, t in zip("qkv", got, expected, (q, k, v), strict=True):
        assert g.shape == t.shape and g.dtype == dtype, name
        assert torch.isfinite(g).all(), name
        assert_close(g, e, "attention", dtype)


# ---- FlashAttention's low-precision rule ------------------------------------------------------

LOW_PRECISION_SHAPES = [(1, 4, 2, 123, 64, 64), (1, 2, 1, 512, 128, 128), (2, 2, 2, 77, 192, 128)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", LOW_PRECISION_SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtype_id)
def test_low_precision_error_within_twice_reference(dtype, shape, causal):
    """Error vs the fp64 oracle <= 2x (+ atol) that of the oracle run in the low dtype."""
    q, k, v = _inputs(shape, dtype, "cpu", seed=3, requires_grad=True)
    mask = _mask("random", shape[0], shape[3], "cpu", seed=3)
    dout = torch.randn(shape[0], shape[1], shape[3], shape[5]).to(dtype)

    def run(fn, cast):
        args = [t.detach().to(cast).requires_grad_(True) for t in (q, k, v)]
        out = fn(*args)
        grads = torch.autograd.grad(out, args, dout.to(cast))
        return [out.detach(), *grads]

    def ours(a, b, c):
        return stackwise.ops.attention(a, b, c, causal=causal, key_padding_mask=mask)

    def oracle(dt):
        def f(a, b, c):
            return attention_reference(
                a, b, c, causal=causal, key_padding_mask=mask, compute_dtype=dt
            )

        return f

    exact = run(oracle(torch.float64), torch.float64)
    mine = run(ours, dtype)
    low = run(oracle(dtype), dtype)
    for name, e, m, lo in zip(["out", "dq", "dk", "dv"], exact, mine, low, strict=True):
        err_mine = (m.double() - e).abs().max().item()
        err_low = (lo.double() - e).abs().max().item()
        assert err_mine <= 2 * err_low + 1e-3, (name, err_mine, err_low)


# Past one key block of the bf16/fp16 packed tile path (512 keys) with an odd tail: the online
# softmax across blocks, the zero padding key, causal blocks cut by the diagonal, and a scale
# that cannot be folded into the exp (<= 0). Where oneDNN's brgemm is unavailable (here forced
# by disabling mkldnn) the BLAS path runs; both must match the oracle.
@pytest.mark.parametrize("scale", [None, -0.05], ids=["default_scale", "negative_scale"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtype_id)
def test_low_precision_several_key_blocks(dtype, causal, scale):
    shape = (1, 8, 2, 1031, 64, 32)
    q, k, v = _inputs(shape, dtype, "cpu", seed=5)
    mask = _mask("empty_rows", shape[0], shape[3], "cpu", seed=5)
    ref = attention_reference(q, k, v, causal=causal, key_padding_mask=mask, scale=scale)
    enabled = torch.backends.mkldnn.enabled
    for use_mkldnn in (True, False):
        torch.backends.mkldnn.enabled = use_mkldnn
        try:
            out, lse = torch.ops.stackwise.attention_forward(q, k, v, mask, causal, scale)
        finally:
            torch.backends.mkldnn.enabled = enabled
        assert_close(out, ref, "attention", dtype)
        assert torch.isinf(lse[0, :, : shape[3] // 3]).all() == causal


# ---- layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_non_contiguous_inputs(device, dtype):
    _skip_without_kernel(device, dtype, 64, 64)
    b, s, hq, hkv, d = 2, 70, 4, 2, 64
    gen = torch.Generator().manual_seed(5)
    # The common layout: projections shaped [B, S, H, D], viewed as [B, H, S, D].
    q = torch.randn(b, s, hq, d, generator=gen).to(dtype).to(device).transpose(1, 2)
    kv = torch.randn(b, s, 2, hkv, d, generator=gen).to(dtype).to(device)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    # Non-unit stride on the head dim too, and a kv head expanded with stride 0.
    q_strided = torch.randn(b, hq, s, 2 * d, generator=gen).to(dtype).to(device)[..., ::2]
    k_expanded = k[:, :1].expand(b, hkv, s, d)
    cases = [(q, k, v), (q_strided, k, v), (q, k_expanded, v)]
    for qq, kk, vv in cases:
        assert not (qq.is_contiguous() and kk.is_contiguous() and vv.is_contiguous())
        for causal in (False, True):
            out = stackwise.ops.attention(qq, kk, vv, causal=causal)
            ref = attention_reference(qq, kk, vv, causal=causal)
            assert_close(out, ref, "attention", dtype)
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (qq, kk, vv))
        dq, dk, dv = _grads(
            lambda a, b_, c: stackwise.ops.attention(a, b_, c),
            qq,
            kk,
            vv,
            torch.ones(b, hq, s, d, dtype=dtype, device=device),
        )
        acc = [t.detach().float().requires_grad_(True) for t in (qq, kk, vv)]
        eq, ek, ev = _grads(
            lambda a, b_, c: attention_reference(a, b_, c),
            *acc,
            torch.ones(b, hq, s, d, device=device),
        )
        for g, e in ((dq, eq), (dk, ek), (dv, ev)):
            assert_close(g, e, "attention", dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=_dtype_id)
def test_fully_masked_rows_give_zeros_not_nan(device, dtype):
    _skip_without_kernel(device, dtype, 64, 64)
    q, k, v = _inputs((2, 2, 1, 9, 64, 64), dtype, device, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    mask[0, :4] = False  # causal rows 0..3 of batch 0 see no key
    mask[1] = False  # batch 1 sees nothing at all
    out, lse = torch.ops.stackwise.attention_forward(q, k, v, mask, True, None)
    assert (out[0, :, :4] == 0).all() and (out[1] == 0).all()
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all()  # the +inf convention
    assert torch.isfinite(out).all()
    out.backward(torch.ones_like(out))
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
    assert (q.grad[0, :, :4] == 0).all() and (q.grad[1] == 0).all()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()
    assert (k.grad[0, :, :4] == 0).all() and (v.grad[0, :, :4] == 0).all()


def test_scale_argument_and_default():
    q, k, v = _inputs((1, 2, 2, 33, 64, 64), torch.float64, "cpu")
    for scale in (None, 0.05, 1.0):
        out = stackwise.ops.attention(q, k, v, scale=scale)
        ref = attention_reference(q, k, v, scale=scale)
        assert_close(out, ref, "attention", torch.float64)


def test_matches_torch_sdpa():
    q, k, v = _inputs((2, 4, 4, 65, 64, 64), torch.float32, "cpu")
    for causal in (False, True):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(
            stackwise.ops.attention(q, k, v, causal=causal), expected, rtol=1e-4, atol=2e-5
        )


def test_deterministic_gqa_backward():
    q, k, v = _inputs((1, 8, 2, 200, 64, 64), torch.float32, "cpu", requires_grad=True)
    dout = torch.randn(1, 8, 200, 64)
    first = _grads(lambda a, b, c: stackwise.ops.attention(a, b, c, causal=True), q, k, v, dout)
    for _ in range(3):
        again = _grads(lambda a, b, c: stackwise.ops.attention(a, b, c, causal=True), q, k, v, dout)
        for x, y in zip(first, again, strict=True):
            assert torch.equal(x, y)


# ---- autograd, opcheck, compile ----------------------------------------------------------------

GRADCHECK_CASES = [
    ((1, 2, 2, 5, 4, 4), False, "none"),
    ((1, 2, 2, 6, 4, 4), True, "none"),
    ((2, 2, 1, 6, 4, 3), True, "random"),
    ((2, 4, 2, 5, 3, 5), False, "empty_rows"),
    ((1, 3, 1, 7, 4, 4), True, "empty_rows"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("shape", "causal", "mask_kind"), GRADCHECK_CASES)
def test_gradcheck_float64(device, shape, causal, mask_kind):
    _skip_without_kernel(device, torch.float64, shape[4], shape[5])
    q, k, v = _inputs(shape, torch.float64, device, requires_grad=True)
    mask = _mask(mask_kind, shape[0], shape[3], device)

    def f(a, b, c):
        return stackwise.ops.attention(a, b, c, causal=causal, key_padding_mask=mask, scale=0.7)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _skip_without_kernel(device)
    if device == "cuda":
        q, k, v = _inputs((2, 4, 2, 9, 64, 64), torch.bfloat16, device)
    else:
        q, k, v = _inputs((2, 4, 2, 9, 8, 6), torch.float32, device)
    mask = _mask("random", 2, 9, device)
    fwd = torch.ops.stackwise.attention_forward.default
    torch.library.opcheck(fwd, (q, k, v, mask, True, None))
    torch.library.opcheck(fwd, (q, k, v, None, False, 0.3))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(fwd, (qg, kg, vg, mask, True, None))
    out, lse = fwd(q, k, v, mask, True, None)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.stackwise.attention_backward.default,
        (dout, q, k, v, out, lse, mask, True, None),
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_cuda_rejects_unsupported_inputs():
    _skip_without_kernel("cuda")
    q, k, v = _inputs((1, 2, 2, 16, 64, 64), torch.float32, "cuda")
    with pytest.raises(NotImplementedError, match="bfloat16 or float16"):
        stackwise.ops.attention(q, k, v)
    q, k, v = _inputs((1, 2, 2, 16, 48, 48), torch.bfloat16, "cuda")
    with pytest.raises(NotImplementedError, match=r"head dims .*\(48, 48\)"):
        stackwise.ops.attention(q, k, v)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hkv", [8, 1], ids=["mha", "gqa8"])
def test_cuda_matches_sdpa_flash(causal, hkv):
    _skip_without_kernel("cuda", torch.bfloat16, 128, 128)
    q, k, v = _inputs((2, 8, hkv, 1024, 128, 128), torch.bfloat16, "cuda", seed=3)
    out = stackwise.ops.attention(q, k, v, causal=causal)
    kr, vr = (t.repeat_interleave(8 // hkv, dim=1) for t in (k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=causal)
    ref = attention_reference(q.float(), kr.float(), vr.float(), causal=causal)
    # FlashAttention's rule: at most twice the error of the bf16 SDPA result.
    err = (out.float() - ref).abs().max().item()
    err_sdpa = (expected.float() - ref).abs().max().item()
    assert err <= 2 * err_sdpa + 1e-3, (err, err_sdpa)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    def f(q, k, v, mask):
        return stackwise.ops.attention(q * 2.0, k, v, causal=True, key_padding_mask=mask) + 1.0

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    q, k, v = _inputs((1, 4, 2, 16, 8, 8), torch.float32, "cpu", requires_grad=True)
    mask = _mask("random", 1, 16, "cpu")
    expected = f(q, k, v, mask)
    actual = compiled(q, k, v, mask)
    torch.testing.assert_close(actual, expected)
    ge = torch.autograd.grad(expected.sum(), (q, k, v))
    ga = torch.autograd.grad(actual.sum(), (q, k, v))
    for a, e in zip(ga, ge, strict=True):
        torch.testing.assert_close(a, e)


# ---- memory contract ----------------------------------------------------------------------------


def _saved_bytes(s: int) -> int:
    q, k, v = _inputs((1, 2, 1, s, 64, 64), torch.float32, "cpu", requires_grad=True)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stackwise.ops.attention(q, k, v, causal=True)
    return total


def test_saved_tensors_grow_linearly_in_sequence_length():
    small, large = _saved_bytes(512), _saved_bytes(2048)
    # q, k, v, out (D floats per row) and lse (1 float per row): exactly linear in S.
    per_row = (2 * 64 + 64 + 64 + 2 * 64 + 2) * 4
    assert small == 512 * per_row and large == 2048 * per_row


_PEAK_RSS_SCRIPT = """
import resource, sys, torch, stackwise
s, d = int(sys.argv[1]), 64
q, k, v = (torch.randn(1, 1, s, d) for _ in range(3))
out, lse = torch.ops.stackwise.attention_forward(q, k, v, None, False, None)
dout = torch.randn_like(out)
op = sys.argv[2]
# Warm up the library paths (BLAS buffers, thread pool) on a small problem first.
qs = q[:, :, :128].contiguous()
o2, l2 = torch.ops.stackwise.attention_forward(qs, qs, qs, None, False, None)
torch.ops.stackwise.attention_backward(o2, qs, qs, qs, o2, l2, None, False, None)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if op == "forward":
    torch.ops.stackwise.attention_forward(q, k, v, None, False, None)
else:
    torch.ops.stackwise.attention_backward(dout, q, k, v, out, lse, None, False, None)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


def _peak_rss_growth(op: str, s: int) -> int:
    """Bytes by which one op call raises the process's peak RSS (a fresh interpreter)."""
    import os
    import subprocess
    import sys

    package_root = os.path.dirname(os.path.dirname(stackwise.__file__))
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    res = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, str(s), op],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return int(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("op", ["forward", "backward"])
def test_ops_allocate_no_s_by_s_buffer(op):
    """Peak memory of one op call is O(S * D): an S x S fp32 matrix at S = 4096 would be 64 MiB;
    the outputs (at most 3 tensors of S * 64 floats) are 3 MiB."""
    for s in (2048, 4096):
        growth = _peak_rss_growth(op, s)
        assert growth < s * s * 4 / 8, (s, growth)


# ---- the BLAS fallback ---------------------------------------------------------------------------

_GEMM_FALLBACK_SCRIPT = """
import torch, stackwise
from stackwise.ops.reference import attention_reference as ref
g = torch.Generator().manual_seed(0)
for dt, tol in ((torch.float64, 1e-7), (torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
    q = torch.randn(2, 4, 150, 40, generator=g).to(dt)
    k, v = (torch.randn(2, 2, 150, 40, generator=g).to(dt) for _ in range(2))
    for causal in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = stackwise.ops.attention(*leaves, causal=causal)
        rl = [t.detach().double().clone().requires_grad_(True) for t in (q, k, v)]
        want = ref(*rl, causal=causal)
        torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
        out.double().pow(2).sum().backward()
        want.pow(2).sum().backward()
        for a, b in zip(leaves, rl):
            torch.testing.assert_close(a.grad.double(), b.grad, atol=10 * tol, rtol=10 * tol)
with torch.autograd.profiler.profile() as prof:
    stackwise.ops.attention(q.float(), k.float(), v.float(), causal=True)
assert any(e.name == "aten::mm" for e in prof.function_events), "fallback not taken"
"""


def test_gemm_fallback_matches_reference():
    """STACKWISE_DIRECT_BLAS=0 takes the path of a libtorch that exports no BLAS symbols (at::mm on
    tile views; bf16 tiles widened to fp32 first). It is read once per process: a subprocess."""
    import os
    import subprocess
    import sys

    package_root = os.path.dirname(os.path.dirname(stackwise.__file__))
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, STACKWISE_DIRECT_BLAS="0", OMP_NUM_THREADS="1", PYTHONPATH=path)
    res = subprocess.run(
        [sys.executable, "-c", _GEMM_FALLBACK_SCRIPT], capture_output=True, text=True, env=env
    )
    assert res.returncode == 0, res.stderr[-2000:]


# ---- bad inputs ---------------------------------------------------------------------------------


def _ok():
    return torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)


@pytest.mark.parametrize(
    ("which", "tensor", "match"),
    [
        ("q", torch.randn(4, 8, 16), r"q must be 4-D \[B, Hq, S, Dqk\], got shape \[4, 8, 16\]"),
        ("k", torch.randn(2, 2, 8, 16, 1), r"k must be 4-D \[B, Hkv, S, Dqk\]"),
        ("v", torch.randn(2, 8, 16), r"v must be 4-D \[B, Hkv, S, Dv\]"),
        ("k", torch.randn(3, 2, 8, 16), "k has batch size 3 at dim 0 but expected 2"),
        ("v", torch.randn(2, 2, 9, 16), "v has sequence length 9 at dim 2 but expected 8"),
        ("k", torch.randn(2, 2, 8, 32), "k has head dim 32 at dim 3 but expected 16"),
        ("kv", torch.randn(2, 3, 8, 16), "multiple of k's 3 heads"),
        ("v", torch.randn(2, 1, 8, 16), "v has kv head count 1 at dim 1 but expected 2"),
    ],
)
def test_rejects_bad_shapes(which, tensor, match):
    q, k, v = _ok()
    args = {"q": q, "k": k, "v": v}
    for name in ("k", "v") if which == "kv" else (which,):
        args[name] = tensor
    with pytest.raises(ValueError, match=match):
        stackwise.ops.attention(args["q"], args["k"], args["v"])


def test_rejects_bad_mask():
    q, k, v = _ok()
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B, S\] = \[2, 8\]"):
        stackwise.ops.attention(q, k, v, key_padding_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        stackwise.ops.attention(q, k, v, key_padding_mask=torch.ones(2, 8))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_rejects_integer_tensors(dtype):
    x = torch.ones(1, 1, 4, 4, dtype=dtype)
    with pytest.raises(TypeError, match="q must be float32, float64, float16 or bfloat16"):
        stackwise.ops.attention(x, x, x)


def test_rejects_mismatched_dtypes():
    q, k, v = _ok()
    with pytest.raises(TypeError, match="v has dtype Double but q has dtype Float"):
        stackwise.ops.attention(q, k, v.double())


def test_rejects_mismatched_devices_meta():
    q, k, v = _ok()
    with pytest.raises(RuntimeError, match="k is on meta but q is on cpu"):
        stackwise.ops.attention(q, k.to("meta"), v)
    with pytest.raises(RuntimeError, match="key_padding_mask is on meta but q is on cpu"):
        stackwise.ops.attention(
            q, k, v, key_padding_mask=torch.ones(2, 8, dtype=torch.bool, device="meta")
        )


def test_backward_op_rejects_bad_saved_tensors():
    q, k, v = _ok()
    out, lse = torch.ops.stackwise.attention_forward(q, k, v, None, False, None)
    with pytest.raises(ValueError, match="grad_out has shape"):
        torch.ops.stackwise.attention_backward(out[:, :, :4], q, k, v, out, lse, None, False, None)
    with pytest.raises(ValueError, match="lse has shape"):
        torch.ops.stackwise.attention_backward(out, q, k, v, out, lse[:, :2], None, False, None)
