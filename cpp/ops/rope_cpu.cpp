// RoPE on CPU: argument checks, allocation and the per-ISA kernel choice. The math lives in
// rope_cpu_kernel.cpp (vectorized loops) and stackwise/rope_math.h (scalar form, pairing).
//   rope(q[B,Hq,S,D], k[B,Hk,S,D], cos[P,R/2], sin[P,R/2], R, offset) -> (q_out, k_out)
//   rope_backward(grad_q, grad_k, cos, sin, R, offset) -> (grad_q_in, grad_k_in)
// Token s uses table row offset + s (offset + S <= P). Features >= R pass through. q and k may
// have different head counts (GQA) and any strides over B, H, S (a non-unit feature stride is
// made contiguous); outputs are contiguous. cos/sin are float32 for every q dtype.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "cpu_alloc.h"
#include "norm_rope_checks.h"
#include "norm_rope_kernels.h"
#include "checks.h"

namespace stackwise {
namespace {

at::Tensor unit_feature_stride(const at::Tensor& t) {
  return t.size(3) <= 1 || t.stride(3) == 1 ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> rope_apply(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& cos, const at::Tensor& sin,
                                              int64_t rotary_dim, int64_t position_offset,
                                              bool inverse) {
  const at::Tensor qc = unit_feature_stride(q);
  const at::Tensor kc = unit_feature_stride(k);
  at::Tensor out_q = cpu::empty_output(q.sizes(), q.options());
  at::Tensor out_k = cpu::empty_output(k.sizes(), k.options());
  if (q.numel() + k.numel() > 0) {
    STACKWISE_CPU_DISPATCH(rope_kernel, qc, kc, cos.contiguous(), sin.contiguous(), rotary_dim,
                           position_offset, inverse, out_q, out_k);
  }
  return {out_q, out_k};
}

std::tuple<at::Tensor, at::Tensor> rope_cpu(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& cos, const at::Tensor& sin,
                                            int64_t rotary_dim, int64_t position_offset) {
  check_rope_inputs(q, "q", k, "k", cos, sin, rotary_dim, position_offset, "rope");
  check_device_type(q, at::kCPU, "rope", "q");
  return rope_apply(q, k, cos, sin, rotary_dim, position_offset, /*inverse=*/false);
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cpu(const at::Tensor& grad_q,
                                                     const at::Tensor& grad_k,
                                                     const at::Tensor& cos, const at::Tensor& sin,
                                                     int64_t rotary_dim,
                                                     int64_t position_offset) {
  check_rope_inputs(grad_q, "grad_q", grad_k, "grad_k", cos, sin, rotary_dim, position_offset,
                    "rope_backward");
  check_device_type(grad_q, at::kCPU, "rope_backward", "grad_q");
  return rope_apply(grad_q, grad_k, cos, sin, rotary_dim, position_offset, /*inverse=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CPU, m) {
  m.impl("rope", &rope_cpu);
  m.impl("rope_backward", &rope_backward_cpu);
}

}  // namespace stackwise
