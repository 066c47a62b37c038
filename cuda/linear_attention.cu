// Linear attention on CUDA: the chunked prefix-sum formulation of linear_attention_chunked.cpp
// (tile products on cuBLAS, one cumsum over chunk states), checked for the device here.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "common.cuh"
#include "linear_attention_checks.h"
#include "linear_attention_chunked.h"

namespace stackwise::cuda {
namespace {

at::Tensor linear_attention_cuda(const at::Tensor& phi_q, const at::Tensor& phi_k,
                                 const at::Tensor& v, bool causal, double eps) {
  check_linear_attention_inputs(phi_q, phi_k, v, "linear_attention");
  check_device_type(phi_q, at::kCUDA, "linear_attention", "phi_q");
  const c10::cuda::CUDAGuard guard(phi_q.device());
  return linear_attention_chunked(phi_q, phi_k, v, causal, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& phi_q, const at::Tensor& phi_k,
    const at::Tensor& v, bool causal, double eps) {
  check_linear_attention_inputs(phi_q, phi_k, v, "linear_attention_backward");
  check_device_type(phi_q, at::kCUDA, "linear_attention_backward", "phi_q");
  const c10::cuda::CUDAGuard guard(phi_q.device());
  return linear_attention_chunked_backward(grad_out, phi_q, phi_k, v, causal, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CUDA, m) {
  m.impl("linear_attention", &linear_attention_cuda);
  m.impl("linear_attention_backward", &linear_attention_backward_cuda);
}

}  // namespace stackwise::cuda
