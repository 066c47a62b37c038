// Per-ISA CPU kernels of linear attention (defined in linear_attention_cpu_kernel.cpp). Inputs
// are contiguous, checked, of one dtype; outputs are preallocated contiguous tensors:
//   forward:  phi_q[B,H,S,M], phi_k[B,H,S,M], v[B,H,S,Dv] -> out[B,H,S,Dv]
//   backward: grad_out[B,H,S,Dv] and the forward's inputs -> grad_q, grad_k, grad_v
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu_isa.h"

STACKWISE_DECLARE_CPU_KERNEL(void, linear_attention_forward_kernel, const at::Tensor& phi_q,
                             const at::Tensor& phi_k, const at::Tensor& v, bool causal, double eps,
                             at::Tensor& out)
STACKWISE_DECLARE_CPU_KERNEL(void, linear_attention_backward_kernel, const at::Tensor& grad_out,
                             const at::Tensor& phi_q, const at::Tensor& phi_k, const at::Tensor& v,
                             bool causal, double eps, at::Tensor& grad_q, at::Tensor& grad_k,
                             at::Tensor& grad_v)
