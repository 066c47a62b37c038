// Dequantize into a caller-owned buffer on the tensor's own device: what quantized_linear uses to
// reuse one tile buffer for a whole weight. CPU kernels in quant_cpu_kernel.cpp, CUDA in
// cuda/quant.cu.
#pragma once

#include <ATen/core/Tensor.h>

namespace stackwise::quant {

// packed uint8 [rows*cols/2], absmax f32 [rows*cols/block] -> out [rows, cols] (contiguous).
void nf4_dequantize_into(const at::Tensor& packed, const at::Tensor& absmax, int64_t block_size,
                         at::Tensor& out);
// q int8/fp8 [rows, cols], scale f32 [rows] -> out [rows, cols] (contiguous).
void rows_dequantize_into(const at::Tensor& q, const at::Tensor& scale, at::Tensor& out);

#if defined(STACKWISE_WITH_CUDA)
void nf4_dequantize_into_cuda(const at::Tensor& packed, const at::Tensor& absmax,
                              int64_t block_size, at::Tensor& out);
void rows_dequantize_into_cuda(const at::Tensor& q, const at::Tensor& scale, at::Tensor& out);
#endif

}  // namespace stackwise::quant
