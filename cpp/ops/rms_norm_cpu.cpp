// RMSNorm on CPU: argument checks, allocation and the per-ISA kernel choice. The math lives in
// rms_norm_cpu_kernel.cpp (vectorized loops) and stackwise/rms_norm_math.h (scalar form).
//   rms_norm(x[..., D], weight[D], eps) -> (out[..., D], rstd[...])
//   rms_norm_backward(grad_out[..., D], x[..., D], weight[D], rstd[...]) -> (grad_x, grad_weight)
// x any strides (made contiguous); out and grad_x are contiguous in x's dtype. weight may be any
// supported float dtype (e.g. float32 weights with bf16 activations): it is used in x's
// accumulation type (float, double for float64 x) and grad_weight comes back in weight's dtype.
// rstd = 1/sqrt(mean(x^2) + eps) is float32 (float64 for float64 x).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "cpu_alloc.h"
#include "norm_rope_checks.h"
#include "norm_rope_kernels.h"
#include "checks.h"

namespace stackwise {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                double eps) {
  check_rms_norm_inputs(x, weight, "rms_norm");
  check_device_type(x, at::kCPU, "rms_norm", "x");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "rms_norm: eps must be finite and >= 0, got ",
                    eps);
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.to(rms_norm_acc_dtype(x)).contiguous();
  at::Tensor out = cpu::empty_output(xc.sizes(), xc.options());
  at::Tensor rstd =
      at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(rms_norm_acc_dtype(x)));
  if (xc.numel() > 0) STACKWISE_CPU_DISPATCH(rms_norm_forward_kernel, xc, w, eps, out, rstd);
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_out,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& rstd) {
  const char* op = "rms_norm_backward";
  check_rms_norm_inputs(x, weight, op);
  check_device_type(x, at::kCPU, op, "x");
  check_rms_norm_saved(grad_out, x, rstd, op);
  const at::Tensor dy = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.to(rms_norm_acc_dtype(x)).contiguous();
  const at::Tensor rs = rstd.contiguous();
  at::Tensor grad_x = cpu::empty_output(xc.sizes(), xc.options());
  at::Tensor grad_w = at::empty({x.size(-1)}, x.options().dtype(rms_norm_acc_dtype(x)));
  if (xc.numel() > 0) {
    STACKWISE_CPU_DISPATCH(rms_norm_backward_kernel, dy, xc, w, rs, grad_x, grad_w);
  } else {
    grad_w.zero_();
  }
  return {grad_x, grad_w.to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
}

}  // namespace stackwise
