// SwiGLU element math (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6 with Swish_1):
//   y = silu(g) * u,  silu(g) = g * sigmoid(g)
// and its derivatives, with s = sigmoid(g):
//   dL/du = dy * g * s
//   dL/dg = dy * u * s * (1 + g * (1 - s))
// Written once for the CPU tail loops and the CUDA kernels, so the CPU tests cover the same
// arithmetic the GPU runs. Always evaluated in float (or double for float64 tensors).
#pragma once

#include <cmath>

#include "stackwise/macros.h"

namespace stackwise::math {

STACKWISE_HOST_DEVICE float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

STACKWISE_HOST_DEVICE double exp_acc(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t sigmoid(acc_t x) {
  // exp(-x) overflows to inf for x < -88 (float); 1/(1+inf) = 0 is the right limit.
  return acc_t(1) / (acc_t(1) + exp_acc(-x));
}

template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t swiglu_forward(acc_t g, acc_t u) {
  return g * sigmoid(g) * u;
}

template <typename acc_t>
STACKWISE_HOST_DEVICE void swiglu_backward(acc_t g, acc_t u, acc_t dy, acc_t& dg, acc_t& du) {
  const acc_t s = sigmoid(g);
  du = dy * g * s;
  dg = dy * u * s * (acc_t(1) + g * (acc_t(1) - s));
}

}  // namespace stackwise::math
