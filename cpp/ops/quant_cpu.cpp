// Quantization ops on CPU: checks, allocation, per-ISA kernel choice (kernels in
// quant_cpu_kernel.cpp, formats in stackwise/quant_formats.h).
//   quantize_nf4(x[*], block_size) -> (packed uint8 [n/2], absmax f32 [n/block])
//   dequantize_nf4(packed, absmax, shape, block_size, dtype) -> [shape]
//   quantize_int8(x[R,D]) -> (q int8 [R,D], scale f32 [R])
//   quantize_fp8(x[R,D], fp8 dtype) -> (q fp8 [R,D], scale f32 [R])
//   dequantize_int8 / dequantize_fp8(q[R,D], scale[R], dtype) -> [R,D]
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "cpu_alloc.h"
#include "quant_kernels.h"
#include "quant_checks.h"

namespace stackwise {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& x, int64_t block_size) {
  quant::check_quantize_nf4(x, block_size);
  check_device_type(x, at::kCPU, "quantize_nf4", "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor packed = at::empty({xc.numel() / 2}, xc.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({xc.numel() / block_size}, xc.options().dtype(at::kFloat));
  if (xc.numel() > 0) STACKWISE_CPU_DISPATCH(nf4_quantize_kernel, xc, block_size, packed, absmax);
  return {packed, absmax};
}

at::Tensor dequantize_nf4_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              at::IntArrayRef shape, int64_t block_size, at::ScalarType dtype) {
  quant::check_dequantize_nf4(packed, absmax, shape, block_size, dtype);
  check_device_type(packed, at::kCPU, "dequantize_nf4", "packed");
  const at::Tensor pc = packed.contiguous();
  const at::Tensor ac = absmax.contiguous();
  at::Tensor out = cpu::empty_output(shape, pc.options().dtype(dtype));
  if (out.numel() > 0) STACKWISE_CPU_DISPATCH(nf4_dequantize_kernel, pc, ac, block_size, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_cpu(const at::Tensor& x) {
  quant::check_rows_input(x, "quantize_int8");
  check_device_type(x, at::kCPU, "quantize_int8", "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor q = at::empty(xc.sizes(), xc.options().dtype(at::kChar));
  at::Tensor scale = at::empty({xc.size(0)}, xc.options().dtype(at::kFloat));
  if (xc.numel() > 0) STACKWISE_CPU_DISPATCH(int8_quantize_rows_kernel, xc, q, scale);
  else scale.zero_();
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cpu(const at::Tensor& x, at::ScalarType fp8) {
  quant::check_rows_input(x, "quantize_fp8");
  check_device_type(x, at::kCPU, "quantize_fp8", "x");
  TORCH_CHECK_TYPE(quant::is_fp8(fp8),
                   "quantize_fp8: fp8_dtype must be float8_e4m3fn or float8_e5m2, got ", fp8);
  const at::Tensor xc = x.contiguous();
  at::Tensor q = at::empty(xc.sizes(), xc.options().dtype(fp8));
  at::Tensor scale = at::empty({xc.size(0)}, xc.options().dtype(at::kFloat));
  if (xc.numel() > 0) STACKWISE_CPU_DISPATCH(fp8_quantize_rows_kernel, xc, q, scale);
  else scale.zero_();
  return {q, scale};
}

at::Tensor dequantize_rows_cpu(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype,
                               const char* op) {
  quant::check_rows_dequantize(q, scale, dtype, op);
  check_device_type(q, at::kCPU, op, "q");
  const at::Tensor qc = q.contiguous();
  const at::Tensor sc = scale.contiguous();
  at::Tensor out = cpu::empty_output(qc.sizes(), qc.options().dtype(dtype));
  if (out.numel() > 0) STACKWISE_CPU_DISPATCH(rows_dequantize_kernel, qc, sc, out);
  return out;
}

at::Tensor dequantize_int8_cpu(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kChar, "dequantize_int8: q must be int8, got ",
                   q.scalar_type());
  return dequantize_rows_cpu(q, scale, dtype, "dequantize_int8");
}

at::Tensor dequantize_fp8_cpu(const at::Tensor& q, const at::Tensor& scale, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(quant::is_fp8(q.scalar_type()),
                   "dequantize_fp8: q must be float8_e4m3fn or float8_e5m2, got ", q.scalar_type());
  return dequantize_rows_cpu(q, scale, dtype, "dequantize_fp8");
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CPU, m) {
  m.impl("quantize_nf4", &quantize_nf4_cpu);
  m.impl("dequantize_nf4", &dequantize_nf4_cpu);
  m.impl("quantize_int8", &quantize_int8_cpu);
  m.impl("dequantize_int8", &dequantize_int8_cpu);
  m.impl("quantize_fp8", &quantize_fp8_cpu);
  m.impl("dequantize_fp8", &dequantize_fp8_cpu);
}

}  // namespace stackwise
