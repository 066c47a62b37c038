"""The native-op fuzzer run by test_fuzz_ops.py, one op family per process.

    python fuzz_ops.py FAMILY MAX_EXAMPLES

For each generated call (hypothesis, derandomized: the same examples every run) it prints the
call before making it, so a crash names its input, then checks one of two outcomes:

- an error: a RuntimeError / ValueError / TypeError whose message starts with the op's name and
  names one of its arguments ("a clear error naming the argument");
- a result: equal to the plain-PyTorch reference (stackwise.ops.reference) within the dtype's
  tolerance; NaN/inf in quantized input must come back as NaN for its block or row.

It also calls the fake (meta) kernel on the same input: it must fail exactly when the CPU kernel
fails and otherwise give the same shapes and dtypes. The last line is a JSON summary.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "python"))
import stackwise  # noqa: E402,F401
from stackwise.ops import reference as ref  # noqa: E402

OPS = torch.ops.stackwise
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ODD_DTYPES = [torch.int32, torch.int64, torch.bool, torch.uint8, torch.int8, torch.float8_e4m3fn]
BIG_INTS = [2**31, 2**32, 2**62, 2**63 - 1, -(2**63), -1]
COUNTS = {"probes": 0, "clear_errors": 0, "results_checked": 0, "fake_checked": 0}
ARGS = {
    "swiglu": ["gate", "up", "grad_out"],
    "rms_norm": ["x", "weight", "eps", "grad_out", "rstd"],
    "rope": ["q", "k", "grad_q", "grad_k", "cos", "sin", "rotary_dim", "position_offset"],
    "linear_attention": ["phi_q", "phi_k", "v", "grad_out", "eps"],
    "attention": ["q", "k", "v", "key_padding_mask", "scale", "grad_out", "out", "lse"],
    "quant": ["x", "block_size", "packed", "absmax", "shape", "dtype", "q", "scale", "fp8_dtype"],
    "linear_cross_entropy": [
        "hidden",
        "weight",
        "bias",
        "labels",
        "grad_losses",
        "label_smoothing",
        "z_loss",
        "reduction",
    ],
    "quantized_linear": [
        "x",
        "grad_out",
        "qweight",
        "scales",
        "fmt",
        "out_features",
        "in_features",
        "block_size",
        "bias",
    ],
}
TOL = {torch.float32: 2e-4, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class Wrong(AssertionError):
    """A silent wrong result or an unclear error: the fuzz test fails."""


# ---- generated inputs ------------------------------------------------------------------------


@st.composite
def dtypes(draw, bad_rate: float = 0.1):
    if _rare(draw, bad_rate):
        return draw(st.sampled_from(ODD_DTYPES))
    return draw(st.sampled_from(FLOATS))


@st.composite
def tensors(draw, shape, dtype=torch.float32, special: bool = False):
    """A tensor of `shape` and `dtype`: random values, sometimes a transposed (non-contiguous)
    layout, sometimes NaN/inf in it (when `special`)."""
    n = math.prod(shape)
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point and dtype.itemsize > 1:
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        if special and n and draw(st.booleans()):
            t.view(-1)[draw(st.integers(0, n - 1))] = draw(
                st.sampled_from([math.nan, math.inf, -math.inf])
            )
    elif dtype == torch.bool:
        t = torch.rand(shape, generator=g) > 0.3
    elif dtype.is_floating_point:
        t = torch.randn(shape, generator=g).to(dtype)
    else:
        t = (
            torch.randint(-5, 5, shape, generator=g).to(dtype)
            if dtype != torch.uint8
            else torch.randint(0, 255, shape, generator=g).to(dtype)
        )
    if len(shape) >= 2 and draw(st.integers(0, 4)) == 0:  # same values, transposed storage
        t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def dim(lo: int = 0, hi: int = 6):
    return st.integers(lo, hi)


def maybe(draw, value, bad, rate: float = 0.15):
    """`value`, or with probability about `rate` one of `bad`."""
    return draw(st.sampled_from(bad)) if _rare(draw, rate) else value


def _rare(draw, rate: float) -> bool:
    """True with probability about `rate`; hypothesis's simplest draw (0) gives False, so
    shrinking heads for valid inputs."""
    return draw(st.integers(0, 99)) >= 100 - round(rate * 100)


# ---- checking ---------------------------------------------------------------------------------


def _error_ok(e: Exception, op: str, family: str) -> None:
    msg = str(e).split("\n")[0]
    if not isinstance(e, RuntimeError | ValueError | TypeError):
        raise Wrong(f"{op}: unexpected {type(e).__name__}: {msg}")
    if not msg.startswith(op.split(".")[0]):
        raise Wrong(f"{op}: error does not name the op: {type(e).__name__}: {msg}")
    if not any(a in msg for a in ARGS[family]):
        raise Wrong(f"{op}: error names no argument: {msg}")


def _shapes(out):
    outs = out if isinstance(out, tuple | list) else (out,)
    return [(tuple(t.shape), t.dtype) for t in outs]


def call(family: str, op: str, fn, args, check=None):
    """Runs op on args (real, then fake); `check(result)` compares a result to the reference."""
    COUNTS["probes"] += 1
    print(f"{op}{_describe(args)}", flush=True)
    try:
        out = fn(*args)
        real_err = None
    except Exception as e:  # noqa: BLE001 - classified below
        real_err = e
        out = None
    if real_err is not None:
        _error_ok(real_err, op, family)
        COUNTS["clear_errors"] += 1
    elif check is not None:
        check(out)
        COUNTS["results_checked"] += 1
    # The fake kernel on the same input.
    with FakeTensorMode() as mode:
        fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        try:
            fout = fn(*fargs)
            fake_err = None
        except Exception as e:  # noqa: BLE001
            fake_err = e
    if (real_err is None) != (fake_err is None):
        raise Wrong(
            f"{op}: CPU {'raised ' + repr(real_err) if real_err else 'accepted'} but the "
            f"fake kernel {'raised ' + repr(fake_err) if fake_err else 'accepted'}"
        )
    if real_err is None and _shapes(out) != _shapes(fout):
        raise Wrong(f"{op}: fake gives {_shapes(fout)}, CPU {_shapes(out)}")
    COUNTS["fake_checked"] += 1
    return out


def _describe(args) -> str:
    def one(a):
        if isinstance(a, torch.Tensor):
            s = "" if a.is_contiguous() else ",T"
            return f"T{list(a.shape)}:{str(a.dtype).removeprefix('torch.')}{s}"
        return repr(a)

    return "(" + ", ".join(one(a) for a in args) + ")"


def close(got: torch.Tensor, want: torch.Tensor, what: str, dtype=None) -> None:
    tol = TOL.get(dtype or got.dtype, 1e-4)
    if got.shape != want.shape:
        raise Wrong(f"{what}: shape {tuple(got.shape)}, reference {tuple(want.shape)}")
    g, w = got.double(), want.double()
    if not torch.allclose(g, w, rtol=tol, atol=tol, equal_nan=True):
        err = (g - w).abs().nan_to_num(math.inf).max()
        raise Wrong(f"{what}: differs from the reference by {float(err):.3g} (tolerance {tol})")


def expect(valid: bool, out, op: str, check) -> None:
    """A valid input must give a result equal to the reference; an invalid one an error."""
    if valid and out is None:
        raise Wrong(f"{op}: rejected a valid input")
    if not valid and out is not None:
        raise Wrong(f"{op}: accepted an invalid input and returned {_shapes(out)}")
    if out is not None:
        check(out)


def run_case(family: str, op: str, fn, args, valid: bool, check) -> None:
    """call() plus the valid/invalid expectation."""
    results = {}

    def checker(out):
        results["out"] = out

    call(family, op, fn, args, checker)
    expect(valid, results.get("out"), op, check)


# ---- families ---------------------------------------------------------------------------------


@st.composite
def swiglu_family(draw):
    shape = draw(st.lists(dim(0, 5), max_size=3))
    dt = draw(dtypes())
    valid = dt in FLOATS
    gate = draw(tensors(shape, dt))
    ushape = maybe(draw, shape, [[*shape, 2], [7]])
    udt = maybe(draw, dt, [torch.float64 if dt != torch.float64 else torch.float32])
    valid &= ushape == shape and udt == dt
    up = draw(tensors(ushape, udt))
    if draw(st.booleans()):
        return (
            "swiglu",
            OPS.swiglu,
            (gate, up),
            valid,
            lambda o: close(o, ref.swiglu_reference(gate, up), "swiglu", dt),
        )
    gshape = maybe(draw, shape, [[*shape, 1], [3]])
    valid &= gshape == shape
    g = draw(tensors(gshape, dt if dt.is_floating_point else torch.float32))
    valid &= g.dtype == dt

    def check(o):
        want = ref.swiglu_backward_reference(g, gate, up)
        close(o[0], want[0], "swiglu_backward grad_gate", dt)
        close(o[1], want[1], "swiglu_backward grad_up", dt)

    return "swiglu_backward", OPS.swiglu_backward, (g, gate, up), valid, check


@st.composite
def rms_norm_family(draw):
    lead = draw(st.lists(dim(0, 4), max_size=2))
    d = draw(dim(0, 9))
    dt = draw(dtypes())
    x = draw(tensors([*lead, d], dt))
    wlen = maybe(draw, d, [d + 1, 0])
    wdt = draw(st.sampled_from(FLOATS))
    w = draw(tensors([wlen], wdt))
    eps = maybe(draw, 1e-6, [math.nan, math.inf, -1.0])
    valid = dt in FLOATS and d > 0 and wlen == d
    if draw(st.booleans()):
        valid &= eps == 1e-6
        return (
            "rms_norm",
            OPS.rms_norm,
            (x, w, eps),
            valid,
            lambda o: close(o[0], ref.rms_norm_reference(x, w, eps), "rms_norm", dt),
        )
    acc = torch.float64 if dt == torch.float64 else torch.float32
    rstd = torch.rsqrt(x.to(acc).pow(2).mean(-1) + 1e-6) if valid else torch.ones(lead)
    rshape = maybe(draw, list(rstd.shape), [[*lead, 2], [5]])
    rdt = maybe(draw, acc, [torch.float16, torch.float64 if acc == torch.float32 else acc])
    rstd = (
        rstd.reshape(-1)[: math.prod(rshape)].reshape(rshape)
        if rshape == list(rstd.shape)
        else torch.ones(rshape)
    )
    rstd = rstd.to(rdt)
    g = draw(
        tensors(maybe(draw, [*lead, d], [[*lead, d + 1]]), dt if dt in FLOATS else torch.float32)
    )
    valid &= g.shape == x.shape and g.dtype == dt and rstd.dtype == acc and list(rstd.shape) == lead

    def check(o):
        want = ref.rms_norm_backward_reference(g, x, w, 1e-6)
        close(o[0], want[0], "rms_norm_backward grad_x", dt)
        coarse = max((dt, wdt), key=lambda t: TOL[t])  # grad_weight is rounded to wdt
        close(o[1], want[1], "rms_norm_backward grad_weight", coarse)

    return "rms_norm_backward", OPS.rms_norm_backward, (g, x, w, rstd), valid, check


@st.composite
def rope_family(draw):
    b, h, hk, s = draw(dim(0, 2)), draw(dim(0, 3)), draw(dim(0, 3)), draw(dim(0, 5))
    d = draw(st.sampled_from([0, 2, 4, 6, 8]))
    dt = draw(dtypes())
    q = draw(tensors([b, h, s, d], dt))
    kshape = maybe(draw, [b, hk, s, d], [[b, hk, s + 1, d], [b, hk, s, d + 2], [b, hk, s]])
    k = draw(tensors(kshape, dt))
    rot = maybe(
        draw,
        draw(st.sampled_from([r for r in (2, 4, 6, 8) if r <= d] or [2])),
        [0, 3, d + 2, 2**32, -2],
    )
    maxpos = draw(dim(1, 12))
    half = max(rot, 0) // 2 if 0 < rot < 2**31 else 1
    pos = torch.arange(maxpos, dtype=torch.float64)[:, None] * torch.linspace(0.1, 1, half)[None]
    cos, sin = pos.cos().float(), pos.sin().float()
    if draw(st.integers(0, 6)) == 0:
        cos = cos.double()
    offset = maybe(draw, draw(st.integers(0, max(0, maxpos - s))), BIG_INTS + [maxpos], 0.25)
    valid = (
        dt in FLOATS
        and kshape == [b, hk, s, d]
        and 0 < rot <= d
        and rot % 2 == 0
        and cos.dtype == torch.float32
        and 0 <= offset
        and offset + s <= maxpos
    )
    name = draw(st.sampled_from(["rope", "rope_backward"]))
    op = OPS.rope if name == "rope" else OPS.rope_backward

    def check(o):
        f = ref.rope_reference if name == "rope" else ref.rope_backward_reference
        want = f(q, k, cos, sin, rot, offset)
        close(o[0], want[0], name + " q", dt)
        close(o[1], want[1], name + " k", dt)

    return name, op, (q, k, cos, sin, rot, offset), valid, check


@st.composite
def linear_attention_family(draw):
    b, h, s, m, dv = (
        draw(dim(0, 2)),
        draw(dim(0, 2)),
        draw(dim(0, 6)),
        draw(dim(0, 5)),
        draw(dim(0, 5)),
    )
    dt = draw(dtypes())
    q = (
        draw(tensors([b, h, s, m], dt)).abs()
        if dt.is_floating_point and dt.itemsize > 1
        else draw(tensors([b, h, s, m], dt))
    )
    kshape = maybe(draw, [b, h, s, m], [[b, h, s, m + 1], [b, h, s]])
    k = draw(tensors(kshape, dt))
    k = k.abs() if dt in FLOATS else k
    vshape = maybe(draw, [b, h, s, dv], [[b, h, s + 1, dv], [b, h + 1, s, dv]])
    v = draw(tensors(vshape, dt))
    causal = draw(st.booleans())
    eps = maybe(draw, 1e-3, [math.nan, -1.0, math.inf])
    valid = dt in FLOATS and kshape == [b, h, s, m] and vshape == [b, h, s, dv] and eps == 1e-3
    if draw(st.booleans()):
        return (
            "linear_attention",
            OPS.linear_attention,
            (q, k, v, causal, eps),
            valid,
            lambda o: close(
                o,
                ref.linear_attention_reference(q, k, v, causal=causal, eps=eps),
                "linear_attention",
                dt,
            ),
        )
    g = draw(tensors(maybe(draw, vshape, [[b, h, s, dv + 1]]), dt))
    valid &= list(g.shape) == vshape

    def check(o):
        xs = [t.detach().double().requires_grad_() for t in (q, k, v)]
        out = ref.linear_attention_reference(*xs, causal=causal, eps=eps)
        want = torch.autograd.grad(out, xs, g.double(), allow_unused=True)
        for got, w, n in zip(o, want, ("grad_q", "grad_k", "grad_v"), strict=True):
            close(got, torch.zeros_like(got) if w is None else w, "linear_attention " + n, dt)

    return (
        "linear_attention_backward",
        OPS.linear_attention_backward,
        (g, q, k, v, causal, eps),
        valid,
        check,
    )


@st.composite
def attention_family(draw):
    b, hkv, group, s = draw(dim(0, 2)), draw(dim(1, 2)), draw(dim(1, 3)), draw(dim(0, 6))
    dqk, dv = draw(st.sampled_from([0, 1, 4, 8])), draw(dim(0, 5))
    dt = draw(dtypes())
    hq = maybe(draw, hkv * group, [hkv * group + 1, 0])
    q = draw(tensors([b, hq, s, dqk], dt))
    kshape = maybe(
        draw, [b, hkv, s, dqk], [[b, hkv, s, dqk + 1], [b, hkv, s + 1, dqk], [b, 0, s, dqk]]
    )
    k = draw(tensors(kshape, dt))
    v = draw(tensors([b, kshape[1], s, dv], dt))
    mask = None
    if draw(st.booleans()):
        mdt = maybe(draw, torch.bool, [torch.float32, torch.int64])
        mask = draw(tensors(maybe(draw, [b, s], [[b, s + 1], [s]]), mdt))
    causal = draw(st.booleans())
    scale = maybe(draw, draw(st.sampled_from([None, 0.5, 2.0])), [math.nan, math.inf])
    valid = (
        dt in FLOATS
        and hq % hkv == 0
        and kshape == [b, hkv, s, dqk]
        and dqk > 0
        and (mask is None or (mask.dtype == torch.bool and list(mask.shape) == [b, s]))
        and (scale is None or math.isfinite(scale))
    )
    if dt in (torch.float16, torch.bfloat16):
        tol_dt = dt
    else:
        tol_dt = dt if dt in FLOATS else torch.float32

    def reference(q, k, v):
        return ref.attention_reference(q, k, v, causal=causal, key_padding_mask=mask, scale=scale)

    def check_forward(o):
        if q.numel() == 0:  # no queries (or no rows): an empty or all-zero output
            close(o[0], torch.zeros(b, hq, s, dv), "attention_forward", tol_dt)
        else:
            close(o[0], reference(q, k, v), "attention_forward", tol_dt)

    if draw(st.booleans()):
        return (
            "attention_forward",
            OPS.attention_forward,
            (q, k, v, mask, causal, scale),
            valid,
            check_forward,
        )
    if valid:
        out, lse = OPS.attention_forward(q, k, v, mask, causal, scale)
    else:
        out, lse = (
            torch.zeros(b, max(hq, 0), s, dv, dtype=q.dtype if dt in FLOATS else torch.float32),
            torch.zeros(b, max(hq, 0), s),
        )
    g = draw(tensors(list(out.shape), out.dtype))

    def check(o):
        if g.numel() == 0:  # nothing flows back: every gradient is zero (or empty)
            for got, t, n in zip(o, (q, k, v), ("grad_q", "grad_k", "grad_v"), strict=True):
                close(got, torch.zeros(t.shape), "attention_backward " + n, tol_dt)
            return
        xs = [t.detach().double().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(reference(*xs), xs, g.double())
        for got, w, n in zip(o, want, ("grad_q", "grad_k", "grad_v"), strict=True):
            close(got, w, "attention_backward " + n, tol_dt)

    return (
        "attention_backward",
        OPS.attention_backward,
        (g, q, k, v, out, lse, mask, causal, scale),
        valid,
        check,
    )


def _nan_rows_close(out: torch.Tensor, x_rows: torch.Tensor, want: torch.Tensor, what: str):
    """Rows of x holding NaN/inf dequantize to all-NaN; the others equal the reference."""
    if x_rows.numel() == 0:
        if out.numel() != 0:
            raise Wrong(f"{what}: {out.numel()} values from an empty input")
        return
    bad = ~x_rows.isfinite().all(dim=1)
    o = out.reshape(x_rows.shape)
    if not bool(o[bad].isnan().all()):
        raise Wrong(f"{what}: a block/row with NaN or inf did not dequantize to NaN")
    close(o[~bad], want.reshape(x_rows.shape)[~bad], what, torch.float32)


@st.composite
def quant_family(draw):
    kind = draw(st.sampled_from(["nf4", "int8", "fp8", "dequantize_nf4", "dequantize_rows"]))
    dt = draw(dtypes())
    if kind == "nf4":
        block = maybe(draw, draw(st.sampled_from([32, 64, 128])), [0, 48, 16, 8192, -64, 2**40])
        n = draw(st.sampled_from([0, 1, 2, 4])) * max(block, 32) if 0 < block < 2**20 else 64
        n = maybe(draw, n, [n + 1])
        x = draw(tensors([n], dt, special=True))
        valid = dt in FLOATS and block in (32, 64, 128) and n % block == 0

        def check(o):
            p, a = o
            if n == 0:
                return
            deq = OPS.dequantize_nf4(p, a, [n], block, torch.float32)
            rows = x.float().reshape(-1, block)
            finite = rows.isfinite().all(1)
            rp, ra = (
                ref.quantize_nf4_reference(rows[finite].reshape(-1), block)
                if bool(finite.any())
                else (None, None)
            )
            want = torch.zeros_like(rows)
            if rp is not None:
                want[finite] = ref.dequantize_nf4_reference(
                    rp, ra, [int(finite.sum()), block], block
                )
            _nan_rows_close(deq, rows, want, "quantize_nf4")

        return "quantize_nf4", OPS.quantize_nf4, (x, block), valid, check
    if kind in ("int8", "fp8"):
        shape = maybe(draw, [draw(dim(0, 4)), draw(dim(0, 9))], [[4], [2, 2, 2], []])
        x = draw(tensors(shape, dt, special=True))
        valid = dt in FLOATS and len(shape) == 2
        if kind == "int8":

            def check(o):
                deq = OPS.dequantize_int8(o[0], o[1], torch.float32)
                if x.numel() == 0:
                    return _nan_rows_close(deq, x.float(), deq, "quantize_int8")
                q, s = ref.quantize_int8_reference(x.float().nan_to_num(0, 0, 0))
                _nan_rows_close(deq, x.float(), q.float() * s, "quantize_int8")

            return "quantize_int8", OPS.quantize_int8, (x,), valid, check
        fp8 = maybe(draw, torch.float8_e4m3fn, [torch.int8, torch.float16])
        valid &= fp8 == torch.float8_e4m3fn

        def check(o):
            deq = OPS.dequantize_fp8(o[0], o[1], torch.float32)
            if x.numel() == 0:
                return _nan_rows_close(deq, x.float(), deq, "quantize_fp8")
            q, s = ref.quantize_fp8_reference(x.float().nan_to_num(0, 0, 0))
            _nan_rows_close(deq, x.float(), q.float() * s, "quantize_fp8")

        return "quantize_fp8", OPS.quantize_fp8, (x, fp8), valid, check
    if kind == "dequantize_nf4":
        block = maybe(draw, 64, [0, 48, -64])
        shape = maybe(draw, [2, 64], [[2, 63], [-2, -64], [2**32, 2**32], [2**62, 4]], 0.3)
        nbytes = maybe(draw, 64, [63, 0])
        packed = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        packed = maybe(draw, packed, [packed.to(torch.int8)])
        absmax = maybe(draw, torch.rand(2), [torch.rand(3), torch.rand(2).double()])
        out_dt = maybe(draw, torch.float32, [torch.int32, torch.bool])
        valid = (
            block == 64
            and shape == [2, 64]
            and nbytes == 64
            and packed.dtype == torch.uint8
            and absmax.shape == (2,)
            and absmax.dtype == torch.float32
            and out_dt == torch.float32
        )
        return (
            "dequantize_nf4",
            OPS.dequantize_nf4,
            (packed, absmax, shape, block, out_dt),
            valid,
            lambda o: close(
                o, ref.dequantize_nf4_reference(packed, absmax, shape, 64), "dequantize_nf4"
            ),
        )
    rows, d = draw(dim(0, 4)), draw(dim(0, 6))
    qdt = draw(st.sampled_from([torch.int8, torch.float8_e4m3fn]))
    q = maybe(draw, torch.randint(-100, 100, (rows, d)).to(qdt), [torch.zeros(rows * d, dtype=qdt)])
    scale = maybe(draw, torch.rand(rows), [torch.rand(rows + 1), torch.rand(rows).half()])
    out_dt = maybe(draw, draw(st.sampled_from(FLOATS)), [torch.int8])
    valid = (
        q.dim() == 2
        and scale.shape == (rows,)
        and scale.dtype == torch.float32
        and out_dt in FLOATS
    )
    name = "dequantize_int8" if qdt == torch.int8 else "dequantize_fp8"
    return (
        name,
        getattr(OPS, name),
        (q, scale, out_dt),
        valid,
        lambda o: close(o, q.float() * scale[:, None], name, out_dt),
    )


@st.composite
def quantized_linear_family(draw):
    fmt = maybe(draw, draw(st.sampled_from(["nf4", "int8", "fp8"])), ["int4", ""])
    n, k = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([32, 64]))
    rows = draw(st.sampled_from([0, 1, 3, 20]))
    dt = draw(dtypes(0.05))
    w = torch.randn(n, k)
    block = 32
    if fmt == "nf4":
        qw, sc = ref.quantize_nf4_reference(w, block)
        wq = ref.dequantize_nf4_reference(qw, sc, [n, k], block)
    elif fmt == "fp8":
        qw, sc = ref.quantize_fp8_reference(w)
        wq = qw.float() * sc
    else:
        qw, sc = ref.quantize_int8_reference(w)
        wq = qw.float() * sc
    decl_n = maybe(draw, n, [0, -1, 2**32, n + 1], 0.2)
    decl_k = maybe(draw, k, [0, 2**32, k + 32], 0.2)
    block = maybe(draw, block, [0, 48], 0.1)
    sc = maybe(draw, sc, [sc.half(), sc.reshape(-1)[:0]], 0.1)
    valid = (
        fmt in ("nf4", "int8", "fp8")
        and dt in FLOATS
        and decl_n == n
        and decl_k == k
        and (fmt != "nf4" or block == 32)
        and sc.dtype == torch.float32
        and sc.numel() > 0
    )
    if draw(st.booleans()):
        bias = None
        if draw(st.booleans()):
            bias = maybe(
                draw,
                torch.randn(n).to(dt if dt in FLOATS else torch.float32),
                [torch.randn(n + 1)],
                0.1,
            )
            valid &= bias.shape == (n,) and bias.dtype == dt
        x = draw(tensors([rows, max(decl_k, 0) if decl_k < 2**20 else k], dt))
        valid &= x.shape[-1] == k

        def check(o):
            want = x.double() @ wq.double().t() + (0 if bias is None else bias.double())
            close(o, want, "quantized_linear", dt if dt != torch.float32 else torch.float16)

        return (
            "quantized_linear",
            OPS.quantized_linear,
            (x, qw, sc, fmt, decl_n, decl_k, block, bias),
            valid,
            check,
        )
    g = draw(tensors([rows, max(decl_n, 0) if decl_n < 2**20 else n], dt))
    valid &= g.shape[-1] == n

    def check(o):
        close(
            o,
            g.double() @ wq.double(),
            "quantized_linear_backward",
            dt if dt != torch.float32 else torch.float16,
        )

    return (
        "quantized_linear_backward",
        OPS.quantized_linear_backward,
        (g, qw, sc, fmt, decl_n, decl_k, block),
        valid,
        check,
    )


@st.composite
def linear_cross_entropy_family(draw):
    """Labels are always in range or ignore_index: the range check needs the values, which a
    fake kernel does not have (tests/python/ops/test_linear_cross_entropy.py covers it)."""
    n, d, v = draw(dim(0, 7)), draw(dim(0, 6)), draw(dim(1, 40))
    dt = draw(dtypes())
    valid = dt in FLOATS
    h = draw(tensors(maybe(draw, [n, d], [[n], [n, d, 1]]), dt))
    wshape = maybe(draw, [v, d], [[v, d + 1], [0, d], [v]])
    wdt = maybe(draw, dt, [torch.float64 if dt != torch.float64 else torch.float32])
    w = draw(tensors(wshape, wdt))
    valid &= list(h.shape) == [n, d] and wshape == [v, d] and wdt == dt
    b = None
    if draw(st.booleans()):
        blen = maybe(draw, v, [v + 1])
        b = draw(tensors([blen], dt))
        valid &= blen == v
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    y = torch.randint(0, max(v, 1), (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.3] = -100
    ylen = maybe(draw, n, [n + 1])
    if ylen != n:
        y = torch.zeros(ylen, dtype=torch.int64)
    ydt = maybe(draw, torch.int64, [torch.int32])
    y = y.to(ydt)
    valid &= ylen == n and ydt == torch.int64
    ls = maybe(draw, draw(st.sampled_from([0.0, 0.1])), [1.5, -0.1])
    zl = maybe(draw, draw(st.sampled_from([0.0, 1e-3])), [-1.0, math.inf])
    valid &= 0.0 <= ls <= 1.0 and 0.0 <= zl < math.inf
    opts = (-100, ls, zl)

    def want(reduction):
        return ref.linear_cross_entropy_reference(
            h, w, y, b, label_smoothing=ls, z_loss=zl, reduction=reduction
        )

    kind = draw(st.sampled_from(["forward", "backward", "fused"]))
    if kind == "forward":
        return (
            "linear_cross_entropy_forward",
            OPS.linear_cross_entropy_forward,
            (h, w, b, y, *opts),
            valid,
            lambda o: close(o[0], want("none"), "linear_cross_entropy_forward", torch.float32),
        )
    if kind == "backward":
        glen = maybe(draw, n, [n + 1])
        gl = torch.rand(glen, generator=g)
        valid &= glen == n

        def check_backward(o):
            acc = torch.float64 if dt == torch.float64 else torch.float32
            hh = h.to(acc).requires_grad_(True)
            ww = w.to(acc).requires_grad_(True)
            loss = ref.linear_cross_entropy_reference(
                hh,
                ww,
                y,
                None if b is None else b.to(acc),
                label_smoothing=ls,
                z_loss=zl,
                reduction="none",
            )
            gh, gw = torch.autograd.grad((loss * gl.to(acc)).sum(), (hh, ww), allow_unused=True)
            close(o[0], gh, "linear_cross_entropy_backward grad_hidden", dt)
            close(o[1], gw, "linear_cross_entropy_backward grad_weight", dt)

        return (
            "linear_cross_entropy_backward",
            OPS.linear_cross_entropy_backward,
            (gl, h, w, b, y, *opts, True),
            valid,
            check_backward,
        )
    red = maybe(draw, draw(st.sampled_from(["mean", "sum"])), ["none", "avg"])
    valid &= red in ("mean", "sum")
    return (
        "linear_cross_entropy_fused",
        OPS.linear_cross_entropy_fused,
        (h, w, b, y, *opts, red, True),
        valid,
        lambda o: close(o[0], want(red), "linear_cross_entropy_fused", torch.float32),
    )


FAMILIES = {
    "swiglu": swiglu_family,
    "rms_norm": rms_norm_family,
    "rope": rope_family,
    "linear_attention": linear_attention_family,
    "attention": attention_family,
    "quant": quant_family,
    "quantized_linear": quantized_linear_family,
    "linear_cross_entropy": linear_cross_entropy_family,
}


def main() -> int:
    family, n = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)

    @settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(FAMILIES[family]())
    def fuzz(case):
        op, fn, args, valid, check = case
        run_case(family, op, fn, args, valid, check)

    fuzz()
    print("SUMMARY " + json.dumps({"family": family, **COUNTS}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
