// Scalar arithmetic of FlashAttention's online softmax and its backward (Dao 2023,
// "FlashAttention-2", Algorithms 1 and 2), shared by the CPU kernels (vector loops fall back to
// these on tails) and the later CUDA kernels, so the CPU tests cover the conventions the GPU uses.
//
// Conventions (one place, so every kernel agrees):
//   - scores are s = scale * q.k; a masked key (padding or j > i under causal) gets s = -inf.
//   - running state per query row: m (max of the scores seen so far, -inf while none is visible)
//     and l (sum of exp(s - m)).
//   - a row whose keys are all masked ends with l = 0: its output is 0 and its log-sum-exp is
//     +inf, so the backward's p = exp(s - lse) is exactly 0 for every key and all gradients of
//     that row vanish without a special case (and without exp(-inf - -inf) = NaN).
//   - accumulation in float (double for float64 tensors).
#pragma once

#include <cmath>
#include <limits>

#include "stackwise/macros.h"

namespace stackwise::math {

template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t pos_inf() {
  return std::numeric_limits<acc_t>::infinity();
}

STACKWISE_HOST_DEVICE float attn_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}

STACKWISE_HOST_DEVICE double attn_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// Query i sees key j: causal attention is aligned top-left (equal query and key lengths).
STACKWISE_HOST_DEVICE bool key_visible(long i, long j, bool causal) { return !causal || j <= i; }

// Number of keys [j0, j0 + n) that query i may see under the causal rule.
STACKWISE_HOST_DEVICE long visible_keys(long i, long j0, long n, bool causal) {
  if (!causal) return n;
  const long v = i - j0 + 1;
  return v < 0 ? 0 : (v > n ? n : v);
}

// The max subtracted before exponentiating: while every key so far is masked (m = -inf) it is 0,
// so exp(-inf - 0) = 0 instead of exp(-inf + inf) = NaN.
template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t safe_max(acc_t m) {
  return m == neg_inf<acc_t>() ? acc_t(0) : m;
}

// Factor that rescales the accumulator and the sum when the running max moves m_old -> m_new.
// exp(-inf - safe) = 0 when nothing was visible before (the accumulator is 0 anyway).
template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t rescale_factor(acc_t m_old, acc_t m_new) {
  return attn_exp(m_old - safe_max(m_new));
}

// The row's 1/l for the final normalisation: 0 for a fully masked row (its output is 0).
template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t inverse_sum(acc_t l) {
  return l > acc_t(0) ? acc_t(1) / l : acc_t(0);
}

// Log-sum-exp saved for the backward: m + log(l), or +inf for a fully masked row.
template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t final_lse(acc_t m, acc_t l) {
  return l > acc_t(0) ? m + std::log(l) : pos_inf<acc_t>();
}

// Backward probability recomputed from the score and the saved log-sum-exp; 0 for a masked key
// (s = -inf) and for every key of a fully masked row (lse = +inf).
template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t prob_from_lse(acc_t s, acc_t lse) {
  return attn_exp(s - lse);
}

// dS = P * (dP - D) with D = rowsum(dO * O) (FlashAttention-2, Algorithm 2, line 13).
template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t score_grad(acc_t p, acc_t dp, acc_t d) {
  return p * (dp - d);
}

}  // namespace stackwise::math
