// Per-ISA CPU kernels of SwiGLU (defined in swiglu_cpu_kernel.cpp). Inputs are contiguous, of
// equal shape and dtype, non-empty; outputs are preallocated contiguous tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu_isa.h"

STACKWISE_DECLARE_CPU_KERNEL(void, swiglu_forward_kernel, const at::Tensor& gate,
                             const at::Tensor& up, at::Tensor& out)
STACKWISE_DECLARE_CPU_KERNEL(void, swiglu_backward_kernel, const at::Tensor& grad_out,
                             const at::Tensor& gate, const at::Tensor& up, at::Tensor& grad_gate,
                             at::Tensor& grad_up)
