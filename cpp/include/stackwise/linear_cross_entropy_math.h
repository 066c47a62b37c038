// Linear cross-entropy math shared by the CPU and CUDA kernels (torch-free, __host__ __device__).
//
// For one token with logits z[V] = W h (+ b), label y, label smoothing eps and z-loss weight lam
// (PaLM, Chowdhery et al. 2022, §5: lam * log^2 Z):
//   lse  = log sum_i exp(z_i)                        (online max/sum, mergeable across pieces)
//   loss = lse - (1 - eps) z_y - (eps / V) sum_i z_i + lam lse^2
//   dloss/dz_i = p_i (1 + 2 lam lse) - (1 - eps) [i == y] - eps / V,   p_i = exp(z_i - lse)
// which is PyTorch's cross_entropy(label_smoothing=eps) (target (1-eps) onehot + eps/V uniform)
// plus the z-loss. The chunk bookkeeping (how many token rows one logits buffer holds) lives here
// too so that the C++ tests cover what both devices run. Accumulation type acc_t is float for
// float/bf16/fp16 storage and double for float64.
#pragma once

#include <cmath>
#include <cstdint>

#include "stackwise/macros.h"

namespace stackwise::math {

STACKWISE_HOST_DEVICE float lce_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

STACKWISE_HOST_DEVICE double lce_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

STACKWISE_HOST_DEVICE float lce_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}

STACKWISE_HOST_DEVICE double lce_log(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

// Running log-sum-exp of a sequence: max m and s = sum exp(x - m). Empty: m = -inf, s = 0.
template <typename acc_t>
struct LseState {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
STACKWISE_HOST_DEVICE LseState<acc_t> lse_empty() {
  return {-INFINITY, acc_t(0)};
}

// Folds one value into the state. -inf values add nothing; the rescale happens only when the
// maximum grows, so a state built left to right costs one exp per value.
template <typename acc_t>
STACKWISE_HOST_DEVICE LseState<acc_t> lse_push(LseState<acc_t> s, acc_t x) {
  if (x == acc_t(-INFINITY)) return s;
  if (x > s.max) {
    const acc_t scaled = s.sum == acc_t(0) ? acc_t(0) : s.sum * lce_exp(s.max - x);
    return {x, scaled + acc_t(1)};
  }
  return {s.max, s.sum + lce_exp(x - s.max)};
}

// The state of the concatenation of two pieces (associative and commutative up to rounding):
// what a block reduction on the GPU and the vocabulary pieces on the CPU both use.
template <typename acc_t>
STACKWISE_HOST_DEVICE LseState<acc_t> lse_merge(LseState<acc_t> a, LseState<acc_t> b) {
  if (b.sum == acc_t(0)) return a;
  if (a.sum == acc_t(0)) return b;
  if (a.max >= b.max) return {a.max, a.sum + b.sum * lce_exp(b.max - a.max)};
  return {b.max, b.sum + a.sum * lce_exp(a.max - b.max)};
}

template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t lse_value(LseState<acc_t> s) {
  return s.sum == acc_t(0) ? acc_t(-INFINITY) : s.max + lce_log(s.sum);
}

// Per-token loss from the row's statistics (see the header comment).
template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t lce_token_loss(acc_t lse, acc_t z_label, acc_t sum_z, int64_t vocab,
                                           acc_t smoothing, acc_t z_loss) {
  acc_t loss = lse - (acc_t(1) - smoothing) * z_label + z_loss * lse * lse;
  if (smoothing != acc_t(0)) loss -= smoothing * sum_z / acc_t(vocab);
  return loss;
}

// The constants of one row's logit gradient, g_i = scale * (p_i * prob_coef - [i == y] *
// label_coef - uniform), computed once per row.
template <typename acc_t>
struct LceGradCoefs {
  acc_t prob_coef;   // scale * (1 + 2 lam lse)
  acc_t label_coef;  // scale * (1 - eps)
  acc_t uniform;     // scale * eps / V
};

template <typename acc_t>
STACKWISE_HOST_DEVICE LceGradCoefs<acc_t> lce_grad_coefs(acc_t lse, int64_t vocab, acc_t smoothing,
                                                         acc_t z_loss, acc_t scale) {
  return {scale * (acc_t(1) + acc_t(2) * z_loss * lse), scale * (acc_t(1) - smoothing),
          scale * smoothing / acc_t(vocab)};
}

template <typename acc_t>
STACKWISE_HOST_DEVICE acc_t lce_logit_grad(acc_t z, acc_t lse, bool is_label,
                                           const LceGradCoefs<acc_t>& c) {
  acc_t g = lce_exp(z - lse) * c.prob_coef - c.uniform;
  if (is_label) g -= c.label_coef;
  return g;
}

// ---- chunk bookkeeping ---------------------------------------------------------------------

// Token rows per logits buffer: as many as fit in `budget_elems` logits of `vocab` columns, at
// least `min_rows` (so the GEMMs stay efficient at huge vocabularies), at most `n_rows`, and a
// multiple of `align` when more than `align` rows fit.
STACKWISE_HOST_DEVICE int64_t lce_rows_per_chunk(int64_t n_rows, int64_t vocab,
                                                 int64_t budget_elems, int64_t min_rows,
                                                 int64_t align) {
  if (n_rows <= 0) return 0;
  int64_t rows = vocab > 0 ? budget_elems / vocab : n_rows;
  if (rows < min_rows) rows = min_rows;
  if (align > 1 && rows > align) rows -= rows % align;
  if (rows < 1) rows = 1;
  return rows < n_rows ? rows : n_rows;
}

STACKWISE_HOST_DEVICE int64_t lce_num_chunks(int64_t n, int64_t chunk) {
  return chunk <= 0 ? 0 : (n + chunk - 1) / chunk;
}

// [begin, end) of chunk `i` of size `chunk` over n items (the last one may be shorter).
struct LceRange {
  int64_t begin;
  int64_t end;
};

STACKWISE_HOST_DEVICE LceRange lce_chunk(int64_t i, int64_t chunk, int64_t n) {
  const int64_t b = i * chunk;
  const int64_t e = b + chunk;
  return {b < n ? b : n, e < n ? e : n};
}

}  // namespace stackwise::math
