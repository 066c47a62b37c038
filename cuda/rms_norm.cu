// RMSNorm on CUDA, the same math as the CPU kernels (stackwise/rms_norm_math.h):
//   rms_norm(x[..., D], weight[D], eps) -> (out[..., D], rstd[...])
//   rms_norm_backward(grad_out, x, weight, rstd) -> (grad_x, grad_weight)
// One warp per row: each lane keeps its share of the row in registers (16-byte packs), so x is
// read once and out written once. The backward's grad_weight is a column sum over rows: every
// warp adds its rows into registers (a lane always owns the same columns), the warps of a block
// combine in shared memory (atomic adds, so the last bit of grad_weight may vary from run to
// run), and each block writes one partial row that a final sum over blocks reduces.
// Rows wider than the register tile (D > 32 lanes * kMaxPacks packs) use the same kernels with a
// second read of the row from L2 instead of registers.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "common.cuh"
#include "norm_rope_checks.h"
#include "checks.h"
#include "stackwise/rms_norm_math.h"

namespace stackwise::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kMaxPacks = 8;  // packs per lane held in registers: D <= 32 * 8 * N

template <typename T>
using acc_type_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Loads pack p of a row into acc_t values (lane k-th pack: p = lane + 32 k, so with k unrolled
// the register tile is indexed statically); the tail pack (D % N != 0) is read element-wise.
template <typename T, typename acc_t, int N>
__device__ __forceinline__ void load_pack(const T* row, int64_t d, int64_t p, bool vec,
                                          acc_t (&out)[N]) {
  const int64_t base = p * N;
  if (vec && base + N <= d) {
    const Pack<T, N> pk = reinterpret_cast<const Pack<T, N>*>(row)[p];
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = acc_t(pk.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = base + j < d ? acc_t(row[base + j]) : acc_t(0);
  }
}

template <typename T, typename acc_t, int N>
__device__ __forceinline__ void store_pack(T* row, int64_t d, int64_t p, bool vec,
                                           const acc_t (&in)[N]) {
  const int64_t base = p * N;
  if (vec && base + N <= d) {
    Pack<T, N> pk;
#pragma unroll
    for (int j = 0; j < N; ++j) pk.v[j] = static_cast<T>(in[j]);
    reinterpret_cast<Pack<T, N>*>(row)[p] = pk;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (base + j < d) row[base + j] = static_cast<T>(in[j]);
    }
  }
}

// CACHED: the row fits the register tile (packs <= 32 * kMaxPacks).
template <typename T, int N, bool CACHED>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    rms_norm_forward_kernel(const T* __restrict__ x, const acc_type_t<T>* __restrict__ w,
                            T* __restrict__ out, acc_type_t<T>* __restrict__ rstd_out,
                            int64_t rows, int64_t d, acc_type_t<T> eps, bool vec) {
  using acc_t = acc_type_t<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t packs = (d + N - 1) / N;
  const int lane_packs = int((packs + kWarp - 1) / kWarp);  // packs per lane
  const int64_t warps_total = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < rows;
       r += warps_total) {
    const T* xr = x + r * d;
    T* yr = out + r * d;
    acc_t cache[CACHED ? kMaxPacks : 1][N];
    acc_t sum_sq = 0;
#pragma unroll
    for (int k = 0; k < (CACHED ? kMaxPacks : lane_packs); ++k) {
      const int64_t p = lane + int64_t(k) * kWarp;
      if (p >= packs) break;
      acc_t v[N];
      load_pack<T, acc_t, N>(xr, d, p, vec, v);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        sum_sq += v[j] * v[j];
        if constexpr (CACHED) cache[k][j] = v[j];
      }
    }
    sum_sq = warp_sum(sum_sq);
    const acc_t r_std = math::rms_norm_rstd<acc_t>(sum_sq, d, eps);
    if (lane == 0) rstd_out[r] = r_std;
#pragma unroll
    for (int k = 0; k < (CACHED ? kMaxPacks : lane_packs); ++k) {
      const int64_t p = lane + int64_t(k) * kWarp;
      if (p >= packs) break;
      acc_t v[N];
      if constexpr (CACHED) {
#pragma unroll
        for (int j = 0; j < N; ++j) v[j] = cache[k][j];
      } else {
        load_pack<T, acc_t, N>(xr, d, p, vec, v);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const int64_t c = p * N + j;
        v[j] = math::rms_norm_forward<acc_t>(v[j], r_std, c < d ? w[c] : acc_t(0));
      }
      store_pack<T, acc_t, N>(yr, d, p, vec, v);
    }
  }
}

// grad_w_partial is [gridDim.x, d] (acc_t): this block's column sums.
template <typename T, int N, bool CACHED>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock)
    rms_norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                             const acc_type_t<T>* __restrict__ w,
                             const acc_type_t<T>* __restrict__ rstd, T* __restrict__ dx,
                             acc_type_t<T>* __restrict__ grad_w_partial, int64_t rows, int64_t d,
                             bool vec) {
  using acc_t = acc_type_t<T>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem_dw = reinterpret_cast<acc_t*>(smem_raw);  // [d]
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) smem_dw[c] = 0;
  __syncthreads();
  const int lane = threadIdx.x % kWarp;
  const int64_t packs = (d + N - 1) / N;
  const int lane_packs = int((packs + kWarp - 1) / kWarp);  // packs per lane
  const int64_t warps_total = int64_t(gridDim.x) * kWarpsPerBlock;
  // Column sums of dy * x * rstd for this lane's columns, over the rows this warp handles.
  acc_t dw[CACHED ? kMaxPacks : 1][N] = {};
  for (int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; r < rows;
       r += warps_total) {
    const T* xr = x + r * d;
    const T* gr = dy + r * d;
    T* dxr = dx + r * d;
    const acc_t r_std = rstd[r];
    acc_t xc[CACHED ? kMaxPacks : 1][N];
    acc_t gc[CACHED ? kMaxPacks : 1][N];
    acc_t dot = 0;
#pragma unroll
    for (int k = 0; k < (CACHED ? kMaxPacks : lane_packs); ++k) {
      const int64_t p = lane + int64_t(k) * kWarp;
      if (p >= packs) break;
      acc_t xv[N], gv[N];
      load_pack<T, acc_t, N>(xr, d, p, vec, xv);
      load_pack<T, acc_t, N>(gr, d, p, vec, gv);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const int64_t c = p * N + j;
        const acc_t wc = c < d ? w[c] : acc_t(0);
        dot += gv[j] * wc * xv[j];
        const acc_t dwj = math::rms_norm_backward_weight<acc_t>(gv[j], xv[j], r_std);
        if constexpr (CACHED) {
          xc[k][j] = xv[j];
          gc[k][j] = gv[j];
          dw[k][j] += dwj;
        } else if (c < d) {
          atomicAdd(&smem_dw[c], dwj);
        }
      }
    }
    dot = warp_sum(dot);
    const acc_t coef = math::rms_norm_backward_coef<acc_t>(dot, r_std, d);
#pragma unroll
    for (int k = 0; k < (CACHED ? kMaxPacks : lane_packs); ++k) {
      const int64_t p = lane + int64_t(k) * kWarp;
      if (p >= packs) break;
      acc_t xv[N], gv[N], out[N];
      if constexpr (CACHED) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
          xv[j] = xc[k][j];
          gv[j] = gc[k][j];
        }
      } else {
        load_pack<T, acc_t, N>(xr, d, p, vec, xv);
        load_pack<T, acc_t, N>(gr, d, p, vec, gv);
      }
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const int64_t c = p * N + j;
        const acc_t wc = c < d ? w[c] : acc_t(0);
        out[j] = math::rms_norm_backward_input<acc_t>(gv[j], xv[j], wc, r_std, coef);
      }
      store_pack<T, acc_t, N>(dxr, d, p, vec, out);
    }
  }
  if constexpr (CACHED) {
#pragma unroll
    for (int k = 0; k < (CACHED ? kMaxPacks : lane_packs); ++k) {
      const int64_t p = lane + int64_t(k) * kWarp;
      if (p >= packs) break;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const int64_t c = p * N + j;
        if (c < d) atomicAdd(&smem_dw[c], dw[k][j]);
      }
    }
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    grad_w_partial[int64_t(blockIdx.x) * d + c] = smem_dw[c];
  }
}

int64_t row_blocks(int64_t rows) {
  return elementwise_blocks((rows + kWarpsPerBlock - 1) / kWarpsPerBlock * kWarp * kWarpsPerBlock,
                            kWarp * kWarpsPerBlock);
}

template <typename T>
bool rows_vectorizable(int64_t d, std::initializer_list<const void*> ptrs) {
  constexpr int N = 16 / sizeof(T);
  if (d % N != 0) return false;
  for (const void* p : ptrs) {
    if (!is_aligned(p, 16)) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                 double eps) {
  check_rms_norm_inputs(x, weight, "rms_norm");
  check_device_type(x, at::kCUDA, "rms_norm", "x");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "rms_norm: eps must be finite and >= 0, got ",
                    eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor w = weight.to(rms_norm_acc_dtype(x)).contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options());
  at::Tensor rstd =
      at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(rms_norm_acc_dtype(x)));
  const int64_t d = x.size(-1);
  const int64_t rows = xc.numel() / d;
  if (rows == 0) return {out, rstd};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    constexpr int N = 16 / sizeof(scalar_t);
    const bool vec = rows_vectorizable<scalar_t>(d, {xc.const_data_ptr(), out.const_data_ptr()});
    const bool cached = (d + N - 1) / N <= int64_t(kWarp) * kMaxPacks;
    const int64_t blocks = row_blocks(rows);
    auto launch = [&](auto kernel) {
      kernel<<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
          out.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<acc_t>(), rows, d, acc_t(eps),
          vec);
    };
    if (cached) {
      launch(rms_norm_forward_kernel<scalar_t, N, true>);
    } else {
      launch(rms_norm_forward_kernel<scalar_t, N, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_out,
                                                          const at::Tensor& x,
                                                          const at::Tensor& weight,
                                                          const at::Tensor& rstd) {
  const char* op = "rms_norm_backward";
  check_rms_norm_inputs(x, weight, op);
  check_device_type(x, at::kCUDA, op, "x");
  check_rms_norm_saved(grad_out, x, rstd, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dy = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::ScalarType acc = rms_norm_acc_dtype(x);
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor rs = rstd.contiguous();
  at::Tensor grad_x = at::empty(xc.sizes(), xc.options());
  const int64_t d = x.size(-1);
  const int64_t rows = xc.numel() / d;
  if (rows == 0) {
    return {grad_x, at::zeros({d}, x.options().dtype(weight.scalar_type()))};
  }
  const int64_t blocks = row_blocks(rows);
  const size_t smem = size_t(d) * (acc == at::kDouble ? sizeof(double) : sizeof(float));
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK_VALUE(smem <= prop->sharedMemPerBlockOptin, op, ": a row of ", d,
                    " features needs ", smem, " bytes of shared memory for grad_weight; this ",
                    "device allows ", prop->sharedMemPerBlockOptin, " per block");
  at::Tensor partial = at::empty({blocks, d}, x.options().dtype(acc));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_backward_cuda", [&] {
        using acc_t = acc_type_t<scalar_t>;
        constexpr int N = 16 / sizeof(scalar_t);
        const bool vec = rows_vectorizable<scalar_t>(
            d, {dy.const_data_ptr(), xc.const_data_ptr(), grad_x.const_data_ptr()});
        const bool cached = (d + N - 1) / N <= int64_t(kWarp) * kMaxPacks;
        auto launch = [&](auto kernel) {
          if (smem > 48 * 1024) {
            C10_CUDA_CHECK(cudaFuncSetAttribute(
                kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
          }
          kernel<<<blocks, kWarp * kWarpsPerBlock, smem, stream>>>(
              dy.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
              w.const_data_ptr<acc_t>(), rs.const_data_ptr<acc_t>(),
              grad_x.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<acc_t>(), rows, d,
              vec);
        };
        if (cached) {
          launch(rms_norm_backward_kernel<scalar_t, N, true>);
        } else {
          launch(rms_norm_backward_kernel<scalar_t, N, false>);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {grad_x, partial.sum(0).to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
}

}  // namespace stackwise::cuda
