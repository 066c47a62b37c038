// SwiGLU on CUDA: out = silu(gate) * up and its backward, the same math as the CPU kernels
// (stackwise/swiglu_math.h), in float registers for every storage type.
// Memory-bound: each thread moves 16-byte packs (4 fp32 or 8 bf16/fp16 elements) through a
// grid-stride loop; the scalar path handles misaligned views and the tail.
// Layout: flat contiguous buffers of n elements.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "common.cuh"
#include "checks.h"
#include "stackwise/swiglu_math.h"

namespace stackwise::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T, int N>
__global__ void swiglu_forward_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                      T* __restrict__ y, int64_t n, bool vectorized) {
  using acc_t = acc_type_t<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t start = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t scalar_from = 0;
  if (vectorized) {
    const int64_t packs = n / N;
    for (int64_t p = start; p < packs; p += stride) {
      const Pack<T, N> gp = reinterpret_cast<const Pack<T, N>*>(g)[p];
      const Pack<T, N> up = reinterpret_cast<const Pack<T, N>*>(u)[p];
      Pack<T, N> yp;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        yp.v[j] = static_cast<T>(math::swiglu_forward<acc_t>(acc_t(gp.v[j]), acc_t(up.v[j])));
      }
      reinterpret_cast<Pack<T, N>*>(y)[p] = yp;
    }
    scalar_from = packs * N;
  }
  for (int64_t i = scalar_from + start; i < n; i += stride) {
    y[i] = static_cast<T>(math::swiglu_forward<acc_t>(acc_t(g[i]), acc_t(u[i])));
  }
}

template <typename T, int N>
__global__ void swiglu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ g,
                                       const T* __restrict__ u, T* __restrict__ dg,
                                       T* __restrict__ du, int64_t n, bool vectorized) {
  using acc_t = acc_type_t<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t start = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t scalar_from = 0;
  if (vectorized) {
    const int64_t packs = n / N;
    for (int64_t p = start; p < packs; p += stride) {
      const Pack<T, N> dyp = reinterpret_cast<const Pack<T, N>*>(dy)[p];
      const Pack<T, N> gp = reinterpret_cast<const Pack<T, N>*>(g)[p];
      const Pack<T, N> up = reinterpret_cast<const Pack<T, N>*>(u)[p];
      Pack<T, N> dgp, dup;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        acc_t a, b;
        math::swiglu_backward<acc_t>(acc_t(gp.v[j]), acc_t(up.v[j]), acc_t(dyp.v[j]), a, b);
        dgp.v[j] = static_cast<T>(a);
        dup.v[j] = static_cast<T>(b);
      }
      reinterpret_cast<Pack<T, N>*>(dg)[p] = dgp;
      reinterpret_cast<Pack<T, N>*>(du)[p] = dup;
    }
    scalar_from = packs * N;
  }
  for (int64_t i = scalar_from + start; i < n; i += stride) {
    acc_t a, b;
    math::swiglu_backward<acc_t>(acc_t(g[i]), acc_t(u[i]), acc_t(dy[i]), a, b);
    dg[i] = static_cast<T>(a);
    du[i] = static_cast<T>(b);
  }
}

void check_swiglu_inputs(const at::Tensor& gate, const at::Tensor& up, const char* op) {
  check_float_tensor(gate, op, "gate");
  check_device_type(gate, at::kCUDA, op, "gate");
  check_like(gate, "gate", up, "up", op);
}

at::Tensor swiglu_cuda(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_inputs(gate, up, "swiglu");
  const c10::cuda::CUDAGuard guard(gate.device());
  const at::Tensor g = gate.contiguous();
  const at::Tensor u = up.contiguous();
  at::Tensor out = at::empty(g.sizes(), g.options());
  const int64_t n = g.numel();
  if (n == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu_cuda", [&] {
    constexpr int N = 16 / sizeof(scalar_t);
    const bool vec = is_aligned(g.const_data_ptr(), 16) && is_aligned(u.const_data_ptr(), 16) &&
                     is_aligned(out.const_data_ptr(), 16);
    const int64_t blocks = elementwise_blocks(vec ? (n + N - 1) / N : n, kThreads);
    swiglu_forward_kernel<scalar_t, N><<<blocks, kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), n, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad_out,
                                                        const at::Tensor& gate,
                                                        const at::Tensor& up) {
  check_swiglu_inputs(gate, up, "swiglu_backward");
  check_like(gate, "gate", grad_out, "grad_out", "swiglu_backward");
  const c10::cuda::CUDAGuard guard(gate.device());
  const at::Tensor dy = grad_out.contiguous();
  const at::Tensor g = gate.contiguous();
  const at::Tensor u = up.contiguous();
  at::Tensor grad_gate = at::empty(g.sizes(), g.options());
  at::Tensor grad_up = at::empty(g.sizes(), g.options());
  const int64_t n = g.numel();
  if (n == 0) return {grad_gate, grad_up};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, g.scalar_type(), "swiglu_backward_cuda", [&] {
        constexpr int N = 16 / sizeof(scalar_t);
        const bool vec = is_aligned(dy.const_data_ptr(), 16) &&
                         is_aligned(g.const_data_ptr(), 16) && is_aligned(u.const_data_ptr(), 16) &&
                         is_aligned(grad_gate.const_data_ptr(), 16) &&
                         is_aligned(grad_up.const_data_ptr(), 16);
        const int64_t blocks = elementwise_blocks(vec ? (n + N - 1) / N : n, kThreads);
        swiglu_backward_kernel<scalar_t, N><<<blocks, kThreads, 0, stream>>>(
            dy.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
            u.const_data_ptr<scalar_t>(), grad_gate.mutable_data_ptr<scalar_t>(),
            grad_up.mutable_data_ptr<scalar_t>(), n, vec);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_gate, grad_up};
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CUDA, m) {
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
}

}  // namespace stackwise::cuda
