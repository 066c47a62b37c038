// Linear attention on CPU: argument checks, allocation and the per-ISA kernel choice. The math is
// documented in stackwise/linear_attention_math.h; the chunked GEMM schedule is in
// linear_attention_cpu_kernel.cpp.
//   linear_attention(phi_q[B,H,S,M], phi_k[B,H,S,M], v[B,H,S,Dv], causal, eps) -> out[B,H,S,Dv]
//   linear_attention_backward(grad_out[B,H,S,Dv], phi_q, phi_k, v, causal, eps)
//       -> (grad_q[B,H,S,M], grad_k[B,H,S,M], grad_v[B,H,S,Dv])
// The backward recomputes the numerators and normalisers from the inputs (one more pass of the
// forward's GEMMs), so only the inputs are saved for it. Inputs of any strides; outputs are
// contiguous.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "cpu_alloc.h"
#include "linear_attention_checks.h"
#include "linear_attention_kernels.h"
#include "checks.h"

namespace stackwise {
namespace {

at::Tensor linear_attention_cpu(const at::Tensor& phi_q, const at::Tensor& phi_k,
                                const at::Tensor& v, bool causal, double eps) {
  constexpr const char* op = "linear_attention";
  check_linear_attention_inputs(phi_q, phi_k, v, op);
  check_device_type(phi_q, at::kCPU, op, "phi_q");
  check_linear_attention_eps(eps, op);
  const at::Tensor q = phi_q.contiguous();
  const at::Tensor k = phi_k.contiguous();
  const at::Tensor vc = v.contiguous();
  at::Tensor out = cpu::empty_output(vc.sizes(), vc.options());
  if (out.numel() == 0) return out;
  if (q.size(3) == 0) return out.zero_();  // no features: every row is 0 / eps
  STACKWISE_CPU_DISPATCH(linear_attention_forward_kernel, q, k, vc, causal, eps, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& phi_q, const at::Tensor& phi_k,
    const at::Tensor& v, bool causal, double eps) {
  constexpr const char* op = "linear_attention_backward";
  check_linear_attention_inputs(phi_q, phi_k, v, op);
  check_device_type(phi_q, at::kCPU, op, "phi_q");
  check_like(v, "v", grad_out, "grad_out", op);
  check_linear_attention_eps(eps, op);
  const at::Tensor q = phi_q.contiguous();
  const at::Tensor k = phi_k.contiguous();
  const at::Tensor vc = v.contiguous();
  at::Tensor grad_q = cpu::empty_output(q.sizes(), q.options());
  at::Tensor grad_k = cpu::empty_output(k.sizes(), k.options());
  at::Tensor grad_v = cpu::empty_output(vc.sizes(), vc.options());
  if (q.size(0) * q.size(1) * q.size(2) == 0) return {grad_q, grad_k, grad_v};
  if (q.size(3) == 0) {
    grad_v.zero_();  // out is 0 whatever v is
    return {grad_q, grad_k, grad_v};
  }
  STACKWISE_CPU_DISPATCH(linear_attention_backward_kernel, grad_out.contiguous(), q, k, vc, causal,
                         eps, grad_q, grad_k, grad_v);
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CPU, m) {
  m.impl("linear_attention", &linear_attention_cpu);
  m.impl("linear_attention_backward", &linear_attention_backward_cpu);
}

}  // namespace stackwise
