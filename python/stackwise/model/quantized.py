"""``QuantizedLinear``: a frozen linear layer whose weight is stored in NF4, int8, fp8 or half
precision and used without ever materialising a full-precision copy between calls.

State (what ``state_dict`` and so safetensors hold): ``qweight`` (packed codes), ``scales``
(float32 absmax; with NF4 double quantization uint8 codes plus ``scales2`` and
``scales_offset``), ``quant_meta`` (int64 ``[format id, block size, out_features, in_features,
format version, double quant]``) and ``bias`` when present — packed bytes, not float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stackwise.exceptions import QuantizationError
from stackwise.ops import quant as q

# Storage precisions a QuantizedLinear can hold, and their ids in quant_meta.
FORMAT_IDS = {"nf4": 1, "int8": 2, "fp8_e4m3": 3, "fp8_e5m2": 4, "fp16": 5, "bf16": 6}
_FORMAT_NAMES = {v: k for k, v in FORMAT_IDS.items()}
_META_VERSION = 1
_DQ_BLOCK = 256


def _empty_storage(precision: str, out_f: int, in_f: int, block: int) -> tuple[Tensor, Tensor]:
    if precision == "nf4":
        return (
            torch.empty(out_f * in_f // 2, dtype=torch.uint8),
            torch.empty(out_f * in_f // block, dtype=torch.float32),
        )
    dtypes = {
        "int8": torch.int8,
        "fp8_e4m3": torch.float8_e4m3fn,
        "fp8_e5m2": torch.float8_e5m2,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
    }
    scales = torch.empty(out_f, dtype=torch.float32)
    if precision in ("fp16", "bf16"):
        scales = torch.empty(0, dtype=torch.float32)
    return torch.empty(out_f, in_f, dtype=dtypes[precision]), scales


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` stored quantized. Differentiable in its input (and bias if unfrozen).

    Args:
        in_features, out_features: as ``nn.Linear``.
        precision: ``"nf4"``, ``"int8"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"fp16"`` or ``"bf16"``.
        block_size: NF4 absmax block (power of two, 32..4096); ignored by the other formats,
            which scale per output row.
        bias: whether the layer has a bias (kept in full precision, frozen by default).
        double_quant: NF4 only: store the absmax values in 8 bits (QLoRA's double
            quantization, blocks of 256), 0.127 instead of 0.5 bits per weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        precision: str = "nf4",
        block_size: int = 64,
        bias: bool = True,
        name: str = "",
        double_quant: bool = False,
    ) -> None:
        super().__init__()
        if precision not in FORMAT_IDS:
            raise QuantizationError(
                f"QuantizedLinear{f' {name}' if name else ''}: unknown precision {precision!r}; "
                f"expected one of {sorted(FORMAT_IDS)}"
            )
        if precision == "nf4":
            q._check_block(block_size, f"QuantizedLinear {name}".strip())
            if (in_features * out_features) % block_size:
                raise QuantizationError(
                    f"QuantizedLinear {name}: weight {out_features}x{in_features} has "
                    f"{in_features * out_features} elements, not a multiple of block_size "
                    f"{block_size}"
                )
        self.in_features = in_features
        self.out_features = out_features
        self.precision = precision
        self.block_size = block_size
        if double_quant and precision != "nf4":
            raise QuantizationError(
                f"QuantizedLinear {name}: double_quant applies to nf4 only, not {precision}"
            )
        self.double_quant = bool(double_quant)
        qweight, scales = _empty_storage(precision, out_features, in_features, block_size)
        self.register_buffer("qweight", qweight)
        if self.double_quant:
            n_abs = scales.numel()
            self.register_buffer("scales", torch.empty(n_abs, dtype=torch.uint8))
            self.register_buffer("scales2", torch.empty(-(-n_abs // _DQ_BLOCK)))
            self.register_buffer("scales_offset", torch.zeros(()))
        else:
            self.register_buffer("scales", scales)
        meta = [
            FORMAT_IDS[precision],
            block_size,
            out_features,
            in_features,
            _META_VERSION,
            int(self.double_quant),
        ]
        self.register_buffer("quant_meta", torch.tensor(meta, dtype=torch.int64))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        precision: str = "nf4",
        block_size: int = 64,
        name: str = "",
        double_quant: bool = False,
    ) -> QuantizedLinear:
        """Quantize an ``nn.Linear``'s weight; the bias is copied in float32, frozen."""
        if not isinstance(linear, nn.Linear):
            raise QuantizationError(
                f"QuantizedLinear.from_linear {name}: expected nn.Linear, got "
                f"{type(linear).__name__}"
            )
        w = linear.weight.detach()
        if w.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise QuantizationError(f"{name or 'linear'}: weight dtype {w.dtype} is not a float")
        mod = cls(
            linear.in_features,
            linear.out_features,
            precision,
            block_size,
            bias=linear.bias is not None,
            name=name,
            double_quant=double_quant,
        )
        mod.to(w.device)
        mod.quantize_(w)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach().float())
        return mod

    @torch.no_grad()
    def quantize_(self, weight: Tensor) -> None:
        """Replace the stored weight by ``weight`` [out_features, in_features], quantized."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise QuantizationError(
                f"QuantizedLinear: weight has shape {tuple(weight.shape)}, expected {expected}"
            )
        p = self.precision
        if p == "nf4":
            qw, sc = q.quantize_nf4(weight, self.block_size)
        elif p == "int8":
            qw, sc = q.quantize_int8(weight, axis=-1)
        elif p in ("fp8_e4m3", "fp8_e5m2"):
            qw, sc = q.quantize_fp8(weight, p[4:], axis=-1)
        else:
            qw = q.to_half(weight, torch.float16 if p == "fp16" else torch.bfloat16, "weight")
            sc = self.scales
        self.qweight = qw.contiguous()
        if self.double_quant:
            codes, scales2, offset = q.double_quantize_absmax(sc, _DQ_BLOCK)
            self.scales, self.scales2, self.scales_offset = codes, scales2, offset
        else:
            self.scales = sc.reshape(-1).contiguous().float()

    def absmax(self) -> Tensor:
        """The per-row or per-block float32 scales (dequantized when double-quantized)."""
        if self.double_quant:
            return q.double_dequantize_absmax(
                self.scales, self.scales2, self.scales_offset, _DQ_BLOCK
            )
        return self.scales

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight ``[out_features, in_features]`` in ``dtype`` (a new tensor)."""
        p = self.precision
        shape = (self.out_features, self.in_features)
        if p == "nf4":
            return q.dequantize_nf4(self.qweight, self.absmax(), shape, self.block_size, dtype)
        if p == "int8":
            return q.dequantize_int8(self.qweight, self.scales.reshape(-1, 1), dtype)
        if p.startswith("fp8"):
            return q.dequantize_fp8(self.qweight, self.scales.reshape(-1, 1), dtype)
        return self.qweight.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        p = self.precision
        if p in ("fp16", "bf16"):
            # A transient cast per call; nothing is kept alive between calls.
            return F.linear(x, self.qweight.to(x.dtype), bias)
        fmt = "nf4" if p == "nf4" else ("int8" if p == "int8" else "fp8")
        return q.quantized_linear(
            x,
            self.qweight,
            self.absmax(),
            fmt,
            self.out_features,
            self.in_features,
            self.block_size,
            bias,
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
    ):
        meta = state_dict.get(prefix + "quant_meta")
        if meta is not None:
            vals = [int(v) for v in meta.tolist()]
            fmt_id, block, out_f, in_f = vals[:4]
            dq = vals[5] if len(vals) > 5 else 0
            ours = (
                FORMAT_IDS[self.precision],
                self.block_size,
                self.out_features,
                self.in_features,
                int(self.double_quant),
            )
            if (fmt_id, block, out_f, in_f, dq) != ours:
                raise QuantizationError(
                    f"QuantizedLinear {prefix.rstrip('.')}: checkpoint holds "
                    f"{_FORMAT_NAMES.get(fmt_id, fmt_id)} {out_f}x{in_f} block {block} "
                    f"double_quant={bool(dq)}, this layer is {self.precision} "
                    f"{self.out_features}x{self.in_features} block {self.block_size} "
                    f"double_quant={self.double_quant}"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing, unexpected, errors
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"precision={self.precision}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}, "
            f"bias={self.bias is not None}"
        )
