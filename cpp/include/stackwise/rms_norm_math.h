// RMSNorm row math (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization", eq. 4):
//   r = 1 / sqrt(mean_j(x_j^2) + eps),  y_j = x_j * r * w_j
// and its derivatives for one row of D features, with g_j = dy_j * w_j:
//   dL/dw_j = sum over rows of dy_j * x_j * r
//   dL/dx_j = r * (g_j - x_j * r^2 * (sum_k g_k * x_k) / D)
// Written once for the CPU tail loops and the CUDA kernels, so the CPU tests cover the same
// arithmetic the GPU runs. Evaluated in float (double for float64 tensors); the statistics r are
// kept in that type and saved for the backward.
#pragma once

#include <cmath>
#include <cstdint>

#include "stackwise/macros.h"

namespace stackwise::math {

template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t rms_norm_rstd(acc_t sum_sq, int64_t d, acc_t eps) {
  // 1/sqrt rather than a hardware rsqrt approximation: it runs once per row.
#if defined(__CUDA_ARCH__)
  return acc_t(1) / ::sqrt(sum_sq / acc_t(d) + eps);
#else
  return acc_t(1) / std::sqrt(sum_sq / acc_t(d) + eps);
#endif
}

template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t rms_norm_forward(acc_t x, acc_t rstd, acc_t w) {
  return x * rstd * w;
}

// The per-row factor of the backward's second term: r^2 * sum_k(g_k x_k) / D, so that
// dL/dx_j = r * (g_j - x_j * c).
template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t rms_norm_backward_coef(acc_t dot_gx, acc_t rstd, int64_t d) {
  return rstd * rstd * dot_gx / acc_t(d);
}

template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t rms_norm_backward_input(acc_t dy, acc_t x, acc_t w, acc_t rstd,
                                                    acc_t coef) {
  return rstd * (dy * w - x * coef);
}

template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t rms_norm_backward_weight(acc_t dy, acc_t x, acc_t rstd) {
  return dy * x * rstd;
}

}  // namespace stackwise::math
