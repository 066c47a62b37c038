// SwiGLU on CPU: argument checks, allocation and the per-ISA kernel choice. The math lives in
// swiglu_cpu_kernel.cpp (vectorized loops) and stackwise/swiglu_math.h (scalar form).
//   swiglu(gate[*], up[*]) -> out[*]                       out = silu(gate) * up
//   swiglu_backward(grad_out[*], gate[*], up[*]) -> (grad_gate[*], grad_up[*])
// Inputs of any shape (equal), any strides; outputs are contiguous.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cpu_alloc.h"
#include "swiglu_kernels.h"

namespace stackwise {
namespace {

void check_swiglu_inputs(const at::Tensor& gate, const at::Tensor& up, const char* op) {
  check_float_tensor(gate, op, "gate");
  check_device_type(gate, at::kCPU, op, "gate");
  check_like(gate, "gate", up, "up", op);
}

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_inputs(gate, up, "swiglu");
  const at::Tensor g = gate.contiguous();
  const at::Tensor u = up.contiguous();
  at::Tensor out = cpu::empty_output(g.sizes(), g.options());
  if (out.numel() > 0) STACKWISE_CPU_DISPATCH(swiglu_forward_kernel, g, u, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad_out,
                                                       const at::Tensor& gate,
                                                       const at::Tensor& up) {
  check_swiglu_inputs(gate, up, "swiglu_backward");
  check_like(gate, "gate", grad_out, "grad_out", "swiglu_backward");
  const at::Tensor dy = grad_out.contiguous();
  const at::Tensor g = gate.contiguous();
  const at::Tensor u = up.contiguous();
  at::Tensor grad_gate = cpu::empty_output(g.sizes(), g.options());
  at::Tensor grad_up = cpu::empty_output(g.sizes(), g.options());
  if (g.numel() > 0) STACKWISE_CPU_DISPATCH(swiglu_backward_kernel, dy, g, u, grad_gate, grad_up);
  return {grad_gate, grad_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace stackwise
