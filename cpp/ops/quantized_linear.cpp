// quantized_linear: y = x · dequant(W)ᵀ + b for a frozen weight stored as NF4 (blockwise), int8 or
// fp8 (per output row), and its input gradient dx = dy · dequant(W). Device-generic (CPU and CUDA
// register the same code): the weight is dequantized `tile_rows` output rows at a time into one
// buffer reused for the whole call, and each tile is one BLAS / cuBLAS matrix product, so no
// full-precision copy of W ever exists (the buffer is at most 8 MB).
//   x [..., K], qweight: nf4 uint8 [N*K/2] | int8/fp8 [N, K], scales: nf4 f32 [N*K/block] |
//   f32 [N]; bias [N] or none -> y [..., N] in x's dtype.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <numeric>
#include <string_view>

#include "cpu_isa.h"
#include "quant_dispatch.h"
#include "quant_kernels.h"
#include "quant_checks.h"

namespace stackwise::quant {

void nf4_dequantize_into(const at::Tensor& packed, const at::Tensor& absmax, int64_t block_size,
                         at::Tensor& out) {
#if defined(STACKWISE_WITH_CUDA)
  if (out.is_cuda()) return nf4_dequantize_into_cuda(packed, absmax, block_size, out);
#endif
  TORCH_CHECK(out.is_cpu(), "quantized_linear: no kernel for device ", out.device());
  STACKWISE_CPU_DISPATCH(nf4_dequantize_kernel, packed, absmax, block_size, out);
}

void rows_dequantize_into(const at::Tensor& q, const at::Tensor& scale, at::Tensor& out) {
#if defined(STACKWISE_WITH_CUDA)
  if (out.is_cuda()) return rows_dequantize_into_cuda(q, scale, out);
#endif
  TORCH_CHECK(out.is_cpu(), "quantized_linear: no kernel for device ", out.device());
  STACKWISE_CPU_DISPATCH(rows_dequantize_kernel, q, scale, out);
}

namespace {

enum class Fmt { NF4, ROWS };

// Up to this many rows of x (e.g. decoding a few tokens), NF4 on CPU uses the fused kernel that
// reads the 4-bit weight once instead of dequantizing it to float32 first: at M=16, K=N=4096
// that moves 8 MB instead of 64 MB + 8 MB. Must not exceed kSmallRows in quant_cpu_kernel.cpp.
constexpr int64_t kFusedMaxRows = 16;

// The dequantized weight tile: one BLAS call per tile, so larger tiles run closer to a single
// full-weight GEMM (at M=1024, K=N=4096 fp32 on a 2-core machine, 128-row tiles took 1.5-2x the
// time of 512-row tiles, noisy). 8 MB is an eighth of a 4096x4096 fp32 weight; rows are rounded
// so each tile starts on an NF4 block boundary.
constexpr int64_t kTileBytes = int64_t(8) << 20;

struct QWeight {
  Fmt fmt;
  at::Tensor q, scales;
  int64_t n, k, block;

  int64_t tile_rows(int64_t elem_size) const {
    int64_t align = 1;
    if (fmt == Fmt::NF4) align = block / std::gcd(k, block);
    int64_t rows = std::max<int64_t>(1, kTileBytes / std::max<int64_t>(1, k * elem_size));
    rows = std::max(align, rows / align * align);
    return std::min(rows, (n + align - 1) / align * align);
  }

  // Whether the fused few-row NF4 kernel applies to a [M, *] operand on this device.
  bool fused_small(const at::Tensor& rows2d) const {
    return fmt == Fmt::NF4 && rows2d.is_cpu() && rows2d.size(0) <= kFusedMaxRows &&
           k % block == 0 && block % 64 == 0 && rows2d.scalar_type() != at::kDouble;
  }

  // Dequantize output rows [r0, r0 + rows) into buf[:rows].
  void dequantize_rows(int64_t r0, int64_t rows, at::Tensor& buf) const {
    at::Tensor out = buf.narrow(0, 0, rows);
    if (fmt == Fmt::NF4) {
      at::Tensor p = q.narrow(0, r0 * k / 2, rows * k / 2);
      at::Tensor a = scales.narrow(0, r0 * k / block, rows * k / block);
      nf4_dequantize_into(p, a, block, out);
    } else {
      rows_dequantize_into(q.narrow(0, r0, rows), scales.narrow(0, r0, rows), out);
    }
  }
};

QWeight make_qweight(const at::Tensor& x_like, const at::Tensor& qweight, const at::Tensor& scales,
                     std::string_view fmt, int64_t n, int64_t k, int64_t block, const char* op) {
  TORCH_CHECK_VALUE(n > 0 && k > 0, op, ": out_features and in_features must be positive, got ",
                    n, " and ", k);
  TORCH_CHECK(qweight.device() == x_like.device() && scales.device() == x_like.device(), op,
              ": qweight (", qweight.device(), ") and scales (", scales.device(),
              ") must be on the input's device ", x_like.device());
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ",
                   scales.scalar_type());
  QWeight w{Fmt::ROWS, qweight.contiguous(), scales.contiguous(), n, k, block};
  if (fmt == "nf4") {
    w.fmt = Fmt::NF4;
    check_nf4_block_size(block, op);
    const int64_t nk = checked_size_mul(n, k, op, "out_features * in_features");
    TORCH_CHECK_VALUE(nk % block == 0, op, ": the weight's ", nk,
                      " elements are not a multiple of block_size ", block);
    TORCH_CHECK_TYPE(qweight.scalar_type() == at::kByte, op, ": nf4 qweight must be uint8, got ",
                     qweight.scalar_type());
    TORCH_CHECK_VALUE(qweight.numel() == nk / 2 && scales.numel() == nk / block, op,
                      ": nf4 qweight has ", qweight.numel(), " bytes and scales ", scales.numel(),
                      " values; a ", n, "x", k, " weight with block_size ", block, " needs ",
                      nk / 2, " and ", nk / block);
    w.q = w.q.reshape({-1});
    w.scales = w.scales.reshape({-1});
  } else if (fmt == "int8" || fmt == "fp8") {
    const bool ok_dtype = fmt == "int8" ? qweight.scalar_type() == at::kChar
                                        : is_fp8(qweight.scalar_type());
    TORCH_CHECK_TYPE(ok_dtype, op, ": ", fmt, " qweight has dtype ", qweight.scalar_type());
    TORCH_CHECK_VALUE(qweight.dim() == 2 && qweight.size(0) == n && qweight.size(1) == k, op,
                      ": qweight must have shape [", n, ", ", k, "], got ", qweight.sizes());
    TORCH_CHECK_VALUE(scales.numel() == n, op, ": scales must have ", n, " values, got ",
                      scales.numel());
    w.scales = w.scales.reshape({-1});
  } else {
    TORCH_CHECK_VALUE(false, op, ": fmt must be 'nf4', 'int8' or 'fp8', got '", fmt, "'");
  }
  return w;
}

at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& qweight,
                            const at::Tensor& scales, c10::string_view fmt, int64_t out_features,
                            int64_t in_features, int64_t block_size,
                            const std::optional<at::Tensor>& bias) {
  const char* op = "quantized_linear";
  check_float_tensor(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == in_features, op, ": x must end in in_features=",
                    in_features, ", got shape ", x.sizes());
  const QWeight w = make_qweight(x, qweight, scales, std::string_view(fmt.data(), fmt.size()),
                                 out_features, in_features, block_size, op);
  if (bias.has_value() && bias->defined()) check_like_shape_1d(*bias, out_features, x, op);

  const at::Tensor x2 = x.reshape({-1, in_features}).contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  if (w.fused_small(x2)) {
    const at::Tensor xf = x2.to(at::kFloat).contiguous();
    at::Tensor yf = at::empty({xf.size(0), out_features}, xf.options());
    STACKWISE_CPU_DISPATCH(nf4_matmul_small_kernel, xf, w.q, w.scales, w.block, yf);
    at::Tensor y = yf.to(x.scalar_type());
    if (bias.has_value() && bias->defined()) y.add_(*bias);
    return y.view(out_shape);
  }
  at::Tensor y2 = at::empty({x2.size(0), out_features}, x2.options());
  const int64_t tr = w.tile_rows(x2.element_size());
  at::Tensor buf = at::empty({tr, in_features}, x2.options());
  for (int64_t r0 = 0; r0 < out_features; r0 += tr) {
    const int64_t rows = std::min(tr, out_features - r0);
    w.dequantize_rows(r0, rows, buf);
    at::Tensor y_tile = y2.narrow(1, r0, rows);
    at::mm_out(y_tile, x2, buf.narrow(0, 0, rows).t());
  }
  if (bias.has_value() && bias->defined()) y2.add_(*bias);
  return y2.view(out_shape);
}

at::Tensor quantized_linear_backward(const at::Tensor& grad_out, const at::Tensor& qweight,
                                     const at::Tensor& scales, c10::string_view fmt,
                                     int64_t out_features, int64_t in_features,
                                     int64_t block_size) {
  const char* op = "quantized_linear_backward";
  check_float_tensor(grad_out, op, "grad_out");
  TORCH_CHECK_VALUE(grad_out.dim() >= 1 && grad_out.size(-1) == out_features, op,
                    ": grad_out must end in out_features=", out_features, ", got shape ",
                    grad_out.sizes());
  const QWeight w = make_qweight(grad_out, qweight, scales, std::string_view(fmt.data(), fmt.size()),
                                 out_features, in_features, block_size, op);
  const at::Tensor g2 = grad_out.reshape({-1, out_features}).contiguous();
  std::vector<int64_t> shape(grad_out.sizes().begin(), grad_out.sizes().end());
  shape.back() = in_features;
  if (w.fused_small(g2)) {
    const at::Tensor gf = g2.to(at::kFloat).contiguous();
    at::Tensor gxf = at::empty({gf.size(0), in_features}, gf.options());
    STACKWISE_CPU_DISPATCH(nf4_matmul_small_backward_kernel, gf, w.q, w.scales, w.block, gxf);
    return gxf.to(grad_out.scalar_type()).view(shape);
  }
  at::Tensor gx = at::zeros({g2.size(0), in_features}, g2.options());
  const int64_t tr = w.tile_rows(g2.element_size());
  at::Tensor buf = at::empty({tr, in_features}, g2.options());
  for (int64_t r0 = 0; r0 < out_features; r0 += tr) {
    const int64_t rows = std::min(tr, out_features - r0);
    w.dequantize_rows(r0, rows, buf);
    gx.addmm_(g2.narrow(1, r0, rows), buf.narrow(0, 0, rows));
  }
  return gx.view(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CPU, m) {
  m.impl("quantized_linear", &quantized_linear);
  m.impl("quantized_linear_backward", &quantized_linear_backward);
}

#if defined(STACKWISE_WITH_CUDA)
TORCH_LIBRARY_IMPL(stackwise, CUDA, m) {
  m.impl("quantized_linear", &quantized_linear);
  m.impl("quantized_linear_backward", &quantized_linear_backward);
}
#endif

}  // namespace stackwise::quant
