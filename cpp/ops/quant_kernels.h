// Per-ISA CPU kernels of the quantization formats (defined in quant_cpu_kernel.cpp; formats in
// stackwise/quant_formats.h). Inputs contiguous; outputs preallocated and contiguous.
//   nf4:  x [n] -> packed uint8 [n/2], absmax float32 [n/block]
//   rows: x [R, D] -> q [R, D] (int8 or float8), scale float32 [R]
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu_isa.h"

STACKWISE_DECLARE_CPU_KERNEL(void, nf4_quantize_kernel, const at::Tensor& x, int64_t block_size,
                             at::Tensor& packed, at::Tensor& absmax)
STACKWISE_DECLARE_CPU_KERNEL(void, nf4_dequantize_kernel, const at::Tensor& packed,
                             const at::Tensor& absmax, int64_t block_size, at::Tensor& out)
// Fused NF4 matrix products for few rows of x (decode each weight block once, reuse it for every
// row): y[M,N] = x[M,K]·Wᵀ and gx[M,K] = g[M,N]·W, float32, K a multiple of block_size.
STACKWISE_DECLARE_CPU_KERNEL(void, nf4_matmul_small_kernel, const at::Tensor& x,
                             const at::Tensor& packed, const at::Tensor& absmax, int64_t block_size,
                             at::Tensor& y)
STACKWISE_DECLARE_CPU_KERNEL(void, nf4_matmul_small_backward_kernel, const at::Tensor& g,
                             const at::Tensor& packed, const at::Tensor& absmax, int64_t block_size,
                             at::Tensor& gx)
STACKWISE_DECLARE_CPU_KERNEL(void, int8_quantize_rows_kernel, const at::Tensor& x, at::Tensor& q,
                             at::Tensor& scale)
STACKWISE_DECLARE_CPU_KERNEL(void, fp8_quantize_rows_kernel, const at::Tensor& x, at::Tensor& q,
                             at::Tensor& scale)
STACKWISE_DECLARE_CPU_KERNEL(void, rows_dequantize_kernel, const at::Tensor& q,
                             const at::Tensor& scale, at::Tensor& out)
