// Argument checks of the quantization ops, shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "checks.h"
#include "stackwise/quant_formats.h"

namespace stackwise::quant {

inline void check_nf4_block_size(int64_t block_size, const char* op) {
  TORCH_CHECK_VALUE(is_power_of_two(block_size) && block_size >= kNf4MinBlock &&
                        block_size <= kNf4MaxBlock,
                    op, ": block_size must be a power of two from ", kNf4MinBlock, " to ",
                    kNf4MaxBlock, ", got ", block_size);
}

inline void check_quantize_nf4(const at::Tensor& x, int64_t block_size) {
  check_float_tensor(x, "quantize_nf4", "x");
  check_nf4_block_size(block_size, "quantize_nf4");
  TORCH_CHECK_VALUE(x.numel() % block_size == 0, "quantize_nf4: x has ", x.numel(),
                    " elements, not a multiple of block_size ", block_size);
}

inline int64_t numel_of(at::IntArrayRef shape, const char* op) {
  return checked_numel(shape, op, "shape");
}

inline void check_dequantize_nf4(const at::Tensor& packed, const at::Tensor& absmax,
                                 at::IntArrayRef shape, int64_t block_size,
                                 at::ScalarType dtype) {
  const char* op = "dequantize_nf4";
  check_nf4_block_size(block_size, op);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ",
                   packed.scalar_type());
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ",
                   absmax.scalar_type());
  TORCH_CHECK(absmax.device() == packed.device(), op, ": absmax is on ", absmax.device(),
              " but packed is on ", packed.device());
  TORCH_CHECK_TYPE(is_supported_float(dtype), op,
                   ": dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  const int64_t n = numel_of(shape, op);
  TORCH_CHECK_VALUE(n % block_size == 0, op, ": shape ", shape, " has ", n,
                    " elements, not a multiple of block_size ", block_size);
  // n is a multiple of block_size (>= 32), so n / 2 and n / block_size are exact.
  TORCH_CHECK_VALUE(packed.numel() == n / 2, op, ": packed has ", packed.numel(),
                    " bytes but shape ", shape, " needs ", n / 2);
  TORCH_CHECK_VALUE(absmax.numel() == n / block_size, op, ": absmax has ", absmax.numel(),
                    " values but shape ", shape, " with block_size ", block_size, " needs ",
                    n / block_size);
}

inline void check_rows_input(const at::Tensor& x, const char* op) {
  check_float_tensor(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [rows, features], got shape ", x.sizes());
}

inline void check_rows_dequantize(const at::Tensor& q, const at::Tensor& scale,
                                  at::ScalarType dtype, const char* op) {
  TORCH_CHECK_VALUE(q.dim() == 2, op, ": q must be 2-D [rows, features], got shape ", q.sizes());
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, op, ": scale must be float32, got ",
                   scale.scalar_type());
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == q.size(0), op,
                    ": scale must have shape [", q.size(0), "], got ", scale.sizes());
  TORCH_CHECK(scale.device() == q.device(), op, ": scale is on ", scale.device(),
              " but q is on ", q.device());
  TORCH_CHECK_TYPE(is_supported_float(dtype), op,
                   ": dtype must be float32, float64, float16 or bfloat16, got ", dtype);
}

// bias: 1-D of `n` values, same dtype and device as x.
inline void check_like_shape_1d(const at::Tensor& bias, int64_t n, const at::Tensor& x,
                                const char* op) {
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == n, op, ": bias must have shape [", n,
                    "], got ", bias.sizes());
  TORCH_CHECK_TYPE(bias.scalar_type() == x.scalar_type(), op, ": bias has dtype ",
                   bias.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(bias.device() == x.device(), op, ": bias is on ", bias.device(), " but x is on ",
              x.device());
}

inline bool is_fp8(at::ScalarType t) {
  return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2;
}

}  // namespace stackwise::quant
