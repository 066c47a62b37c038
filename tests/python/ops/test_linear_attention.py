"""linear_attention op: kernel vs the explicit S x S oracle over dtypes, devices, sequence lengths
around the chunk size, odd feature/value widths and strides; autograd and gradcheck; opcheck;
torch.compile; the normaliser's eps; and the errors bad inputs must raise."""

from __future__ import annotations

import pytest
import torch

import stackwise
from stackwise.ops.reference import linear_attention_reference
from utils import DEVICES, FLOAT_DTYPES, assert_close

# 1 and 7 fit in one partial chunk, 123 is one full chunk of 64 plus a partial one, 512 is 8 full.
SEQ_LENS = [1, 7, 123, 512]


@pytest.fixture(autouse=True)
def _skip_cuda_without_kernel(request):
    # CUDA cases skip (not fail) in a build without the CUDA kernels.
    device = getattr(request.node, "callspec", None) and request.node.callspec.params.get("device")
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "stackwise::linear_attention", "CUDA"
    )
    if device == "cuda" and not has_cuda_kernel:
        pytest.skip("stackwise::linear_attention has no CUDA kernel in this build")


def _inputs(shape_qk, dv, dtype, device, seed=0):
    """Positive features (as a feature map would give) and signed values."""
    gen = torch.Generator().manual_seed(seed)
    b, h, s, m = shape_qk
    q = torch.rand(b, h, s, m, generator=gen, dtype=torch.float64) + 0.05
    k = torch.rand(b, h, s, m, generator=gen, dtype=torch.float64) + 0.05
    v = torch.randn(b, h, s, dv, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype).to(device) for t in (q, k, v))


def _reference_grads(q, k, v, grad_out, causal, eps=1e-6):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    leaves = [t.detach().to(acc).requires_grad_(True) for t in (q, k, v)]
    out = linear_attention_reference(*leaves, causal=causal, eps=eps)
    out.backward(grad_out.to(acc))
    return [t.grad for t in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_matches_reference(device, dtype, seq_len, causal):
    q, k, v = _inputs((2, 3, seq_len, 5), 7, dtype, device)
    out = stackwise.ops.linear_attention(q, k, v, causal=causal)
    assert out.shape == v.shape and out.dtype == dtype and out.device == v.device
    assert out.is_contiguous()
    expected = linear_attention_reference(q, k, v, causal=causal)
    assert_close(out, expected, "linear_attention", dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("causal", [False, True])
def test_backward_matches_reference(device, dtype, seq_len, causal):
    q, k, v = _inputs((2, 2, seq_len, 9), 3, dtype, device, seed=1)
    gen = torch.Generator().manual_seed(3)
    grad_out = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    stackwise.ops.linear_attention(*leaves, causal=causal).backward(grad_out)
    expected = _reference_grads(q, k, v, grad_out, causal)
    for leaf, ref in zip(leaves, expected, strict=True):
        assert leaf.grad.dtype == dtype
        assert_close(leaf.grad, ref, "linear_attention", dtype)


@pytest.mark.parametrize("seq_len", [63, 64, 65, 129])
@pytest.mark.parametrize("causal", [False, True])
def test_chunk_boundaries_wide_heads(seq_len, causal):
    # Lengths on either side of the 64-row chunk, M = Dv = 64 as in the benchmark.
    q, k, v = _inputs((1, 2, seq_len, 64), 64, torch.float64, "cpu", seed=4)
    out = stackwise.ops.linear_attention(q, k, v, causal=causal)
    expected = linear_attention_reference(q, k, v, causal=causal)
    assert_close(out, expected, "linear_attention", torch.float64)


def test_causal_row_equals_non_causal_prefix():
    q, k, v = _inputs((1, 1, 100, 6), 4, torch.float64, "cpu", seed=5)
    causal = stackwise.ops.linear_attention(q, k, v, causal=True)
    for s in (0, 63, 64, 99):
        prefix = stackwise.ops.linear_attention(
            q[:, :, : s + 1], k[:, :, : s + 1], v[:, :, : s + 1], causal=False
        )
        torch.testing.assert_close(causal[:, :, s], prefix[:, :, s])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous_inputs(device, dtype, causal):
    gen = torch.Generator().manual_seed(6)
    # [B, S, H, M] projections viewed as [B, H, S, M], as a model produces them.
    q = torch.rand(2, 70, 3, 10, generator=gen).to(dtype).to(device).transpose(1, 2)
    k = torch.rand(2, 70, 3, 20, generator=gen).to(dtype).to(device).transpose(1, 2)[..., ::2]
    v = torch.randn(2, 3, 70, 11, generator=gen).to(dtype).to(device)[..., 1:10]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = stackwise.ops.linear_attention(*leaves, causal=causal)
    assert_close(out, linear_attention_reference(q, k, v, causal=causal), "linear_attention", dtype)
    grad_out = torch.randn(out.shape, generator=gen).to(dtype).to(device)
    out.backward(grad_out)
    for leaf, ref in zip(leaves, _reference_grads(q, k, v, grad_out, causal), strict=True):
        assert_close(leaf.grad, ref, "linear_attention", dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_featureless_inputs(device):
    q, k, v = _inputs((2, 0, 5, 3), 4, torch.float32, device)
    assert stackwise.ops.linear_attention(q, k, v).shape == (2, 0, 5, 4)
    q, k, v = _inputs((1, 2, 0, 3), 4, torch.float32, device)
    assert stackwise.ops.linear_attention(q, k, v, causal=True).shape == (1, 2, 0, 4)
    # M = 0: no scores at all, the output is 0 / eps = 0 and v gets a zero gradient.
    q, k, v = _inputs((1, 2, 5, 0), 4, torch.float32, device)
    v.requires_grad_(True)
    out = stackwise.ops.linear_attention(q, k, v)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v))


@pytest.mark.parametrize("causal", [False, True])
def test_zero_normaliser_gives_zero_rows(causal):
    # relu features can vanish: a query row of zeros has q.sum(k) = 0, so den = eps and the row
    # is 0 / eps = 0, with finite gradients.
    q, k, v = _inputs((1, 1, 9, 4), 3, torch.float64, "cpu", seed=7)
    q[0, 0, 3] = 0.0
    k[0, 0, :2] = 0.0
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = stackwise.ops.linear_attention(*leaves, causal=causal, eps=1e-6)
    assert torch.equal(out[0, 0, 3], torch.zeros(3, dtype=torch.float64))
    if causal:  # rows 0 and 1 only see zero keys
        assert torch.equal(out[0, 0, :2], torch.zeros(2, 3, dtype=torch.float64))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert_close(
        out,
        linear_attention_reference(q, k, v, causal=causal, eps=1e-6),
        "linear_attention",
        torch.float64,
    )


@pytest.mark.parametrize("eps", [0.0, 1e-3, 10.0])
def test_eps_is_added_to_the_normaliser(eps):
    q, k, v = _inputs((1, 2, 20, 4), 5, torch.float64, "cpu", seed=8)
    out = stackwise.ops.linear_attention(q, k, v, causal=True, eps=eps)
    expected = linear_attention_reference(q, k, v, causal=True, eps=eps)
    assert_close(out, expected, "linear_attention", torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_len", [5, 70])
def test_gradcheck_float64(device, causal, seq_len):
    q, k, v = _inputs((1, 2, seq_len, 3), 4, torch.float64, device, seed=9)
    leaves = tuple(t.requires_grad_(True) for t in (q, k, v))

    def f(a, b, c):
        return stackwise.ops.linear_attention(a, b, c, causal=causal, eps=1e-3)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck(device, causal):
    q, k, v = _inputs((2, 2, 70, 5), 3, torch.float32, device)
    op = torch.ops.stackwise.linear_attention.default
    torch.library.opcheck(op, (q, k, v, causal, 1e-6))
    leaves = tuple(t.clone().requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(op, (*leaves, causal, 1e-6))
    torch.library.opcheck(
        torch.ops.stackwise.linear_attention_backward.default,
        (torch.randn_like(v), q, k, v, causal, 1e-6),
    )


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_torch_compile_fullgraph(causal):
    def f(q, k, v):
        return stackwise.ops.linear_attention(torch.relu(q) + 0.1, k, v * 2.0, causal=causal) + 1.0

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    q, k, v = _inputs((1, 2, 33, 4), 5, torch.float32, "cpu")
    q.requires_grad_(True)
    expected = f(q, k, v)
    actual = compiled(q, k, v)
    torch.testing.assert_close(actual, expected)
    (dq_e,) = torch.autograd.grad(expected.sum(), q)
    (dq_a,) = torch.autograd.grad(actual.sum(), q)
    torch.testing.assert_close(dq_a, dq_e)


# ---- bad inputs -------------------------------------------------------------------------------


def _good():
    return _inputs((2, 3, 8, 4), 5, torch.float32, "cpu")


def test_rejects_wrong_rank():
    q, k, v = _good()
    with pytest.raises(ValueError, match=r"phi_q must be a 4-D tensor \[B, H, S, M\]"):
        stackwise.ops.linear_attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match=r"v must be a 4-D tensor \[B, H, S, Dv\]"):
        stackwise.ops.linear_attention(q, k, v[0])


@pytest.mark.parametrize(
    ("which", "sizes", "pattern"),
    [
        ("phi_k", (1, 3, 8, 4), r"phi_k has shape \[1, 3, 8, 4\] but phi_q has shape"),
        ("phi_k", (2, 2, 8, 4), r"phi_k has shape \[2, 2, 8, 4\] but phi_q has shape"),
        ("phi_k", (2, 3, 7, 4), r"phi_k has shape \[2, 3, 7, 4\] but phi_q has shape"),
        ("phi_k", (2, 3, 8, 5), r"phi_k has shape \[2, 3, 8, 5\] but phi_q has shape"),
        ("v", (1, 3, 8, 5), r"v has shape \[1, 3, 8, 5\]; its \[B, H, S\] must match phi_q"),
        ("v", (2, 3, 9, 5), r"v has shape \[2, 3, 9, 5\]; its \[B, H, S\] must match phi_q"),
    ],
)
def test_rejects_mismatched_shapes(which, sizes, pattern):
    q, k, v = _good()
    args = {"phi_q": q, "phi_k": k, "v": v}
    args[which] = torch.rand(sizes)
    with pytest.raises(ValueError, match=pattern):
        stackwise.ops.linear_attention(args["phi_q"], args["phi_k"], args["v"])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_rejects_integer_tensors(dtype):
    q, k, v = _good()
    with pytest.raises(TypeError, match="phi_q must be float32, float64, float16 or bfloat16"):
        stackwise.ops.linear_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    with pytest.raises(TypeError, match="v has dtype .* but phi_q has dtype Float"):
        stackwise.ops.linear_attention(q, k, v.to(dtype))


def test_rejects_mismatched_float_dtypes():
    q, k, v = _good()
    with pytest.raises(TypeError, match="phi_k has dtype Double but phi_q has dtype Float"):
        stackwise.ops.linear_attention(q, k.double(), v)


@pytest.mark.parametrize("eps", [-1e-6, float("nan"), float("inf")])
def test_rejects_bad_eps(eps):
    q, k, v = _good()
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        stackwise.ops.linear_attention(q, k, v, eps=eps)


@pytest.mark.parametrize("which", ["phi_k", "v"])
def test_rejects_mismatched_devices_meta(which):
    q, k, v = _good()
    args = {"phi_q": q, "phi_k": k, "v": v}
    args[which] = args[which].to("meta")
    with pytest.raises(RuntimeError, match=f"{which} is on meta but phi_q is on cpu"):
        stackwise.ops.linear_attention(args["phi_q"], args["phi_k"], args["v"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
def test_rejects_mismatched_devices_cuda():
    q, k, v = _good()
    with pytest.raises(RuntimeError, match="v is on cpu but phi_q is on cuda"):
        stackwise.ops.linear_attention(q.cuda(), k.cuda(), v)


def test_backward_op_rejects_bad_grad_out():
    q, k, v = _good()
    bwd = torch.ops.stackwise.linear_attention_backward
    with pytest.raises(ValueError, match=r"grad_out has shape \[2, 3, 8, 2\] but v has shape"):
        bwd(v[..., :2], q, k, v, False, 1e-6)
    with pytest.raises(TypeError, match="grad_out has dtype Double but v has dtype Float"):
        bwd(v.double(), q, k, v, False, 1e-6)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        bwd(v, q, k, v, True, -1.0)


def test_aten_gemm_fallback_matches_reference():
    # STACKWISE_DIRECT_BLAS=0 takes the path builds without exported BLAS symbols use (at::mm on
    # tile views); it is read once per process, hence the subprocess.
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import torch, stackwise\n"
        "from stackwise.ops.reference import linear_attention_reference as ref\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dt in (torch.float64, torch.float32):\n"
        "    q, k = (torch.rand(2, 2, 150, 5, generator=g, dtype=dt) for _ in range(2))\n"
        "    v = torch.randn(2, 2, 150, 3, generator=g, dtype=dt)\n"
        "    for causal in (False, True):\n"
        "        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]\n"
        "        out = stackwise.ops.linear_attention(*leaves, causal=causal)\n"
        "        torch.testing.assert_close(out, ref(q, k, v, causal=causal))\n"
        "        out.sum().backward()\n"
        "        rl = [t.clone().requires_grad_(True) for t in (q, k, v)]\n"
        "        ref(*rl, causal=causal).sum().backward()\n"
        "        for a, b in zip(leaves, rl):\n"
        "            torch.testing.assert_close(a.grad, b.grad)\n"
        "with torch.autograd.profiler.profile() as prof:\n"
        "    stackwise.ops.linear_attention(q, k, v, causal=True)\n"
        "assert any(e.name == 'aten::mm' for e in prof.function_events), 'fallback not taken'\n"
    )
    python_dir = Path(stackwise.__file__).resolve().parent.parent
    env = {**os.environ, "STACKWISE_DIRECT_BLAS": "0"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(python_dir), env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


# ---- the chunked formulation the CUDA dispatch runs, checked on CPU tensors --------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_len", [1, 7, 64, 123, 200])
@pytest.mark.parametrize("chunk", [1, 16, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_formulation_matches_reference(dtype, seq_len, chunk, causal):
    q, k, v = _inputs((2, 3, seq_len, 5), 7, dtype, "cpu", seed=4)
    out = stackwise._C._linear_attention_chunked(q, k, v, causal, 1e-6, chunk)
    assert out.shape == v.shape and out.dtype == dtype and out.is_contiguous()
    assert_close(out, linear_attention_reference(q, k, v, causal=causal), "linear_attention", dtype)
    grad_out = torch.randn(v.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    got = stackwise._C._linear_attention_chunked_backward(grad_out, q, k, v, causal, 1e-6, chunk)
    expected = _reference_grads(q, k, v, grad_out, causal)
    for g, e, t in zip(got, expected, (q, k, v), strict=True):
        assert g.shape == t.shape and g.dtype == dtype
        assert_close(g, e, "linear_attention", dtype)


def test_chunked_formulation_rejects_bad_chunk_and_eps():
    q, k, v = _inputs((1, 1, 8, 4), 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        stackwise._C._linear_attention_chunked(q, k, v, True, 1e-6, 0)
    with pytest.raises(ValueError, match="eps"):
        stackwise._C._linear_attention_chunked(q, k, v, True, float("nan"), 8)
