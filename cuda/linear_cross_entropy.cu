// Linear cross-entropy on CUDA: the row kernel (one block per token row of a logits chunk) and
// the CUDA registration. The chunk loop and its GEMMs (cuBLAS through ATen) are the same driver
// as on the CPU (cpp/ops/linear_cross_entropy.cpp); the per-row math is shared through
// stackwise/linear_cross_entropy_math.h: each thread folds its strided columns into an online
// log-sum-exp state, the block merges the states (lse_merge) with the row sum and the first
// index of the maximum, and, when a gradient is wanted, each thread overwrites its columns with
// scale * dloss/dlogits.
// Layout: logits [n, V] float32/float64 contiguous, labels [n] int64, losses [n], predictions
// [n] int64, row_scale [n] with any stride (0: one scale for every row).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "common.cuh"
#include "linear_cross_entropy.h"
#include "checks.h"
#include "stackwise/linear_cross_entropy_math.h"

namespace stackwise::cuda {
namespace {

constexpr int kThreads = 256;
// 64M float32 logits (256 MiB) per chunk, at least 1024 rows: on the GPU the buffer is cheap
// next to N x V and larger GEMMs keep the tensor cores busy.
constexpr int64_t kCudaBudget = int64_t(1) << 26;
constexpr int64_t kCudaMinRows = 1024;

template <typename acc_t>
struct RowStats {
  math::LseState<acc_t> lse;
  acc_t sum_z;
  acc_t best;
  int64_t best_idx;
};

template <typename acc_t>
__device__ RowStats<acc_t> combine(const RowStats<acc_t>& a, const RowStats<acc_t>& b) {
  RowStats<acc_t> r;
  r.lse = math::lse_merge(a.lse, b.lse);
  r.sum_z = a.sum_z + b.sum_z;
  const bool take_b = b.best > a.best || (b.best == a.best && b.best_idx < a.best_idx);
  r.best = take_b ? b.best : a.best;
  r.best_idx = take_b ? b.best_idx : a.best_idx;
  return r;
}

template <typename acc_t>
__global__ void lce_rows_cuda_kernel(acc_t* __restrict__ logits, const int64_t* __restrict__ labels,
                                     acc_t* __restrict__ losses, int64_t* __restrict__ predictions,
                                     const acc_t* __restrict__ row_scale, int64_t scale_stride,
                                     int64_t vocab, int64_t ignore_index, acc_t smoothing,
                                     acc_t z_loss) {
  __shared__ RowStats<acc_t> shared[kThreads];
  __shared__ acc_t row_lse;
  const int64_t row = blockIdx.x;
  acc_t* z = logits + row * vocab;
  RowStats<acc_t> s{math::lse_empty<acc_t>(), acc_t(0), acc_t(-INFINITY),
                    std::numeric_limits<int64_t>::max()};
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const acc_t x = z[i];
    s.lse = math::lse_push(s.lse, x);
    s.sum_z += x;
    if (x > s.best) {
      s.best = x;
      s.best_idx = i;
    }
  }
  shared[threadIdx.x] = s;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      shared[threadIdx.x] = combine(shared[threadIdx.x], shared[threadIdx.x + half]);
    }
    __syncthreads();
  }
  const int64_t y = labels[row];
  const bool ignored = y == ignore_index;
  if (threadIdx.x == 0) {
    const RowStats<acc_t> t = shared[0];
    const acc_t lse = math::lse_value(t.lse);
    row_lse = lse;
    losses[row] = ignored ? acc_t(0)
                          : math::lce_token_loss<acc_t>(lse, z[y], t.sum_z, vocab, smoothing,
                                                        z_loss);
    if (predictions != nullptr) {
      predictions[row] = t.best_idx == std::numeric_limits<int64_t>::max() ? 0 : t.best_idx;
    }
  }
  if (row_scale == nullptr) return;
  __syncthreads();  // row_lse and the label's logit are read before any column is overwritten
  const acc_t scale = row_scale[row * scale_stride];
  if (ignored || scale == acc_t(0)) {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) z[i] = acc_t(0);
    return;
  }
  const acc_t lse = row_lse;
  const math::LceGradCoefs<acc_t> c =
      math::lce_grad_coefs<acc_t>(lse, vocab, smoothing, z_loss, scale);
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    z[i] = math::lce_logit_grad<acc_t>(z[i], lse, i == y, c);
  }
}

void cuda_rows(at::Tensor& logits, const at::Tensor& labels, at::Tensor& losses,
               at::Tensor& predictions, const at::Tensor& row_scale, const lce::Options& opt) {
  const int64_t n = logits.size(0);
  if (n == 0) return;
  const int64_t vocab = logits.size(1);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool want_grad = row_scale.defined();
  int64_t* preds = predictions.defined() ? predictions.mutable_data_ptr<int64_t>() : nullptr;
  if (logits.scalar_type() == at::kDouble) {
    lce_rows_cuda_kernel<double><<<n, kThreads, 0, stream>>>(
        logits.mutable_data_ptr<double>(), labels.const_data_ptr<int64_t>(),
        losses.mutable_data_ptr<double>(), preds,
        want_grad ? row_scale.const_data_ptr<double>() : nullptr,
        want_grad ? row_scale.stride(0) : 0, vocab, opt.ignore_index, opt.label_smoothing,
        opt.z_loss);
  } else {
    lce_rows_cuda_kernel<float><<<n, kThreads, 0, stream>>>(
        logits.mutable_data_ptr<float>(), labels.const_data_ptr<int64_t>(),
        losses.mutable_data_ptr<float>(), preds,
        want_grad ? row_scale.const_data_ptr<float>() : nullptr,
        want_grad ? row_scale.stride(0) : 0, vocab, opt.ignore_index,
        static_cast<float>(opt.label_smoothing), static_cast<float>(opt.z_loss));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                const c10::optional<at::Tensor>& bias,
                                                const at::Tensor& labels, int64_t ignore_index,
                                                double label_smoothing, double z_loss) {
  check_device_type(hidden, at::kCUDA, "linear_cross_entropy_forward", "hidden");
  const c10::cuda::CUDAGuard guard(hidden.device());
  return lce::forward_op(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss,
                         at::kCUDA, &cuda_rows, kCudaBudget, kCudaMinRows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_losses, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& labels, int64_t ignore_index,
    double label_smoothing, double z_loss, bool weight_grad) {
  check_device_type(hidden, at::kCUDA, "linear_cross_entropy_backward", "hidden");
  const c10::cuda::CUDAGuard guard(hidden.device());
  return lce::backward_op(grad_losses, hidden, weight, bias, labels, ignore_index,
                          label_smoothing, z_loss, weight_grad, at::kCUDA, &cuda_rows,
                          kCudaBudget, kCudaMinRows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double label_smoothing, double z_loss,
    c10::string_view reduction, bool weight_grad) {
  check_device_type(hidden, at::kCUDA, "linear_cross_entropy_fused", "hidden");
  const c10::cuda::CUDAGuard guard(hidden.device());
  return lce::fused_op(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss,
                       reduction, weight_grad, at::kCUDA, &cuda_rows, kCudaBudget, kCudaMinRows);
}

}  // namespace

TORCH_LIBRARY_IMPL(stackwise, CUDA, m) {
  m.impl("linear_cross_entropy_forward", &forward_cuda);
  m.impl("linear_cross_entropy_backward", &backward_cuda);
  m.impl("linear_cross_entropy_fused", &fused_cuda);
}

}  // namespace stackwise::cuda
