// RoPE on CUDA, the same pairing and rotation as the CPU kernels (stackwise/rope_math.h):
//   rope(q[B,Hq,S,D], k[B,Hk,S,D], cos[P,R/2], sin[P,R/2], R, offset) -> (q_out, k_out)
//   rope_backward(grad_q, grad_k, cos, sin, R, offset) -> the inverse rotation
// q and k go through one launch. A thread owns N consecutive pairs (i, i + R/2) of one row: it
// reads both halves and the N cos/sin values as 16-byte packs, rotates in float and writes both
// halves, so every element is read once and written once. Features from R on are copied.
// Inputs may have any strides over B, H, S (unit feature stride); outputs are contiguous.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "common.cuh"
#include "norm_rope_checks.h"
#include "checks.h"
#include "stackwise/rope_math.h"

namespace stackwise::cuda {
namespace {

constexpr int kThreads = 256;

struct RopeTensor {
  const void* in;
  void* out;
  int64_t heads, stride_b, stride_h, stride_s;
};

// One tensor's rows: work item w covers row w / items_per_row and, within it, pair group
// (w % items_per_row) when below pair_groups, else pass-through element.
template <typename T, int N, bool VEC>
__device__ __forceinline__ void rope_item(const RopeTensor& t, int64_t w, int64_t seq,
                                          int64_t d, int64_t half, int64_t pair_groups,
                                          int64_t items_per_row, const float* __restrict__ cos,
                                          const float* __restrict__ sin, int64_t offset,
                                          float sign) {
  const int64_t row = w / items_per_row;
  const int64_t item = w % items_per_row;
  const int64_t s = row % seq;
  const int64_t h = (row / seq) % t.heads;
  const int64_t b = row / (seq * t.heads);
  const T* x = static_cast<const T*>(t.in) + b * t.stride_b + h * t.stride_h + s * t.stride_s;
  T* y = static_cast<T*>(t.out) + row * d;
  if (item >= pair_groups) {  // pass-through feature
    const int64_t f = 2 * half + (item - pair_groups);
    y[f] = x[f];
    return;
  }
  const int64_t i0 = item * N;
  const float* c_row = cos + (offset + s) * half;
  const float* s_row = sin + (offset + s) * half;
  if constexpr (VEC) {
    const Pack<T, N> a = *reinterpret_cast<const Pack<T, N>*>(x + i0);
    const Pack<T, N> bb = *reinterpret_cast<const Pack<T, N>*>(x + i0 + half);
    Pack<T, N> oa, ob;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      float ra, rb;
      math::rope_rotate_pair<float>(float(a.v[j]), float(bb.v[j]), c_row[i0 + j],
                                    sign * s_row[i0 + j], ra, rb);
      oa.v[j] = static_cast<T>(ra);
      ob.v[j] = static_cast<T>(rb);
    }
    *reinterpret_cast<Pack<T, N>*>(y + i0) = oa;
    *reinterpret_cast<Pack<T, N>*>(y + i0 + half) = ob;
  } else {
    using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
    for (int64_t i = i0; i < i0 + N && i < half; ++i) {
      acc_t ra, rb;
      math::rope_rotate_pair<acc_t>(acc_t(x[i]), acc_t(x[i + half]), acc_t(c_row[i]),
                                    acc_t(sign * s_row[i]), ra, rb);
      y[i] = static_cast<T>(ra);
      y[i + half] = static_cast<T>(rb);
    }
  }
}

template <typename T, int N, bool VEC>
__global__ void rope_kernel(RopeTensor q, RopeTensor k, int64_t q_items, int64_t total_items,
                            int64_t seq, int64_t d, int64_t half, int64_t pair_groups,
                            int64_t items_per_row, const float* __restrict__ cos,
                            const float* __restrict__ sin, int64_t offset, float sign) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t w = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; w < total_items; w += stride) {
    if (w < q_items) {
      rope_item<T, N, VEC>(q, w, seq, d, half, pair_groups, items_per_row, cos, sin, offset,
                           sign);
    } else {
      rope_item<T, N, VEC>(k, w - q_items, seq, d, half, pair_groups, items_per_row, cos, sin,
                           offset, sign);
    }
  }
}

bool strides_aligned(const at::Tensor& t, size_t elem) {
  for (int dim = 0; dim < 3; ++dim) {
    if ((t.stride(dim) * int64_t(elem)) % 16 != 0 && t.size(dim) > 1) return false;
  }
  return is_aligned(t.const_data_ptr(), 16);
}

std::tuple<at::Tensor, at::Tensor> rope_apply_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                   const at::Tensor& cos_in,
                                                   const at::Tensor& sin_in, int64_t rotary_dim,
                                                   int64_t position_offset, bool inverse) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.size(3) <= 1 || q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.size(3) <= 1 || k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor cos = cos_in.contiguous();
  const at::Tensor sin = sin_in.contiguous();
  at::Tensor out_q = at::empty(q.sizes(), q.options());
  at::Tensor out_k = at::empty(k.sizes(), k.options());
  const int64_t seq = q.size(2), d = q.size(3), half = rotary_dim / 2;
  const int64_t q_rows = q.size(0) * q.size(1) * seq;
  const int64_t k_rows = k.size(0) * k.size(1) * seq;
  if (q_rows + k_rows == 0 || d == 0) return {out_q, out_k};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rope_cuda", [&] {
    constexpr int N = 16 / sizeof(scalar_t);
    const bool vec = half % N == 0 && strides_aligned(q, sizeof(scalar_t)) &&
                     strides_aligned(k, sizeof(scalar_t)) && is_aligned(out_q.const_data_ptr(), 16) &&
                     is_aligned(out_k.const_data_ptr(), 16) && (d * sizeof(scalar_t)) % 16 == 0;
    const int64_t pair_groups = (half + N - 1) / N;
    const int64_t items_per_row = pair_groups + (d - rotary_dim);
    const RopeTensor tq{q.const_data_ptr(), out_q.mutable_data_ptr(), q.size(1), q.stride(0),
                        q.stride(1), q.stride(2)};
    const RopeTensor tk{k.const_data_ptr(), out_k.mutable_data_ptr(), k.size(1), k.stride(0),
                        k.stride(1), k.stride(2)};
    const int64_t q_items = q_rows * items_per_row;
    const int64_t total = q_items + k_rows * items_per_row;
    const int64_t blocks = elementwise_blocks(total, kThreads);
    const float sign = inverse ? -1.f : 1.f;
    auto launch = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, stream>>>(tq, tk, q_items, total, seq, d, half, pair_groups,
                                              items_per_row, cos.const_data_ptr<float>(),
                                              sin.const_data_ptr<float>(), position_offset, sign);
    };
    if (vec) {
      launch(rope_kernel<scalar_t, N, true>);
    } else {
      launch(rope_kernel<scalar_t, N, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out_q, out_k};
}

std::tuple<at::Tensor, at::Tensor> rope_cuda(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& cos, const at::Tensor& sin,
                                             int64_t rotary_dim, int64_t position_offset) {
  check_rope_inputs(q, "q", k, "k", cos, sin, rotary_dim, position_offset, "rope");
  check_device_type(q, at::kCUDA, "rope", "q");
  return rope_apply_cuda(q, k, cos, sin, rotary_dim, position_offset, /*inverse=*/false);
}

std::tuple<at::Tensor, at::Tensor> rope_backward_cuda(const at::Tensor& grad_q,
                                                      const at::Tensor& grad_k,
                                                      const at::Tensor& cos,
                                                      const at::Tensor& sin, int64_t rotary_dim,
                                                      int64_t position_offset) {
  check_rope_inputs(grad_q, "grad_q", grad_k, "grad_k", cos, sin, rotary_dim, position_offset,
                    "rope_backward");
  check_device_type(grad_q, at::kCUDA, "rope_backward", "grad_q");
  return rope_apply_cuda(grad_q, grad_k, cos, sin, rotary_dim, position_offset, /*inverse=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CUDA, m) {
  m.impl("rope", &rope_cuda);
  m.impl("rope_backward", &rope_backward_cuda);
}

}  // namespace stackwise::cuda
