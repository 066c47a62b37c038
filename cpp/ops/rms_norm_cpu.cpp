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
#include "norm_rope_kernels.h"
#include "stackwise/checks.h"

namespace stackwise {
namespace {

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_rms_norm_inputs(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check_float_tensor(x, op, "x");
  check_device_type(x, at::kCPU, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension (features last), got ",
                    "a 0-d tensor");
  TORCH_CHECK_VALUE(x.size(-1) > 0, op, ": x's last (feature) dimension must be non-empty, got ",
                    "shape ", x.sizes());
  check_float_tensor(weight, op, "weight");
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(),
              " but x is on ", x.device(), "; both must be on the same device");
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == x.size(-1), op,
                    ": weight must have shape [", x.size(-1), "] (x's last dimension), got ",
                    weight.sizes());
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                double eps) {
  check_rms_norm_inputs(x, weight, "rms_norm");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "rms_norm: eps must be finite and >= 0, got ",
                    eps);
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.to(acc_dtype(x)).contiguous();
  at::Tensor out = cpu::empty_output(xc.sizes(), xc.options());
  at::Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_dtype(x)));
  if (xc.numel() > 0) STACKWISE_CPU_DISPATCH(rms_norm_forward_kernel, xc, w, eps, out, rstd);
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_out,
                                                         const at::Tensor& x,
                                                         const at::Tensor& weight,
                                                         const at::Tensor& rstd) {
  const char* op = "rms_norm_backward";
  check_rms_norm_inputs(x, weight, op);
  check_like(x, "x", grad_out, "grad_out", op);
  TORCH_CHECK(rstd.defined(), op, ": rstd is an undefined tensor");
  TORCH_CHECK(rstd.device() == x.device(), op, ": rstd is on ", rstd.device(), " but x is on ",
              x.device(), "; both must be on the same device");
  TORCH_CHECK_TYPE(rstd.scalar_type() == acc_dtype(x), op, ": rstd must have dtype ",
                   acc_dtype(x), " (x's accumulation type), got ", rstd.scalar_type());
  TORCH_CHECK_VALUE(rstd.sizes() == x.sizes().slice(0, x.dim() - 1), op, ": rstd must have shape ",
                    x.sizes().slice(0, x.dim() - 1), " (x's leading dimensions), got ",
                    rstd.sizes());
  const at::Tensor dy = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.to(acc_dtype(x)).contiguous();
  const at::Tensor rs = rstd.contiguous();
  at::Tensor grad_x = cpu::empty_output(xc.sizes(), xc.options());
  at::Tensor grad_w = at::empty({x.size(-1)}, x.options().dtype(acc_dtype(x)));
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
