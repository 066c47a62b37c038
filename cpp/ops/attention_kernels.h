// Per-ISA CPU kernels of attention (attention_fwd_cpu_kernel.cpp, attention_bwd_cpu_kernel.cpp).
//
// Layout: q [B, Hq, S, Dqk], k [B, Hkv, S, Dqk], v [B, Hkv, S, Dv], any strides with a unit
// last-dimension stride (the dispatcher makes it so). key_bias is undefined (no padding mask) or
// a contiguous [B, S] tensor of the accumulation dtype holding 0 (attend) or -inf (masked).
// Outputs are preallocated and contiguous: out [B, Hq, S, Dv] (input dtype), lse [B, Hq, S]
// (float32, float64 for float64); for the backward grad_q [B, Hq, S, Dqk] (input dtype) and the
// per-query-head accumulators dk_acc [B, Hq, S, Dqk], dv_acc [B, Hq, S, Dv] (accumulation dtype,
// zero-filled) that the dispatcher sums over each GQA group.
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu_isa.h"

STACKWISE_DECLARE_CPU_KERNEL(void, attention_forward_kernel, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& key_bias, bool causal, double scale,
                             at::Tensor& out, at::Tensor& lse)
STACKWISE_DECLARE_CPU_KERNEL(void, attention_backward_kernel, const at::Tensor& grad_out,
                             const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& out, const at::Tensor& lse,
                             const at::Tensor& key_bias, bool causal, double scale,
                             at::Tensor& grad_q, at::Tensor& dk_acc, at::Tensor& dv_acc)
