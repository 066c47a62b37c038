// Per-ISA CPU kernels of RMSNorm and RoPE (defined in rms_norm_cpu_kernel.cpp and
// rope_cpu_kernel.cpp). The dispatchers (rms_norm_cpu.cpp, rope_cpu.cpp) check the arguments,
// make the inputs contiguous where the kernel needs it and preallocate the outputs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "cpu_isa.h"

// x, out: [rows, d] contiguous, same dtype; weight: [d] contiguous in the accumulation dtype
// (float, or double for float64 x); rstd: [rows] accumulation dtype. rows, d > 0.
STACKWISE_DECLARE_CPU_KERNEL(void, rms_norm_forward_kernel, const at::Tensor& x,
                             const at::Tensor& weight, double eps, at::Tensor& out,
                             at::Tensor& rstd)
// grad_out, x, grad_x: [rows, d] contiguous, x's dtype; weight, rstd as above; grad_weight: [d]
// in the accumulation dtype, overwritten with the sum over rows (fixed reduction order: the
// result does not depend on the thread count).
STACKWISE_DECLARE_CPU_KERNEL(void, rms_norm_backward_kernel, const at::Tensor& grad_out,
                             const at::Tensor& x, const at::Tensor& weight,
                             const at::Tensor& rstd, at::Tensor& grad_x, at::Tensor& grad_weight)

// q [B, Hq, S, D], k [B, Hk, S, D]: any strides with stride(3) == 1; out_q, out_k contiguous of
// the same shapes and dtype; cos/sin [P, rotary_dim/2] contiguous float32 with
// position_offset + S <= P. `inverse` rotates by -angle (the backward).
STACKWISE_DECLARE_CPU_KERNEL(void, rope_kernel, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& cos, const at::Tensor& sin, int64_t rotary_dim,
                             int64_t position_offset, bool inverse, at::Tensor& out_q,
                             at::Tensor& out_k)
